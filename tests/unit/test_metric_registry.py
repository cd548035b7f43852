"""trl_gspo/metrics.py: its patterns, TRL's own keys, and the documentation's metrics page, the registry rendered."""

import importlib.util
import re
from pathlib import Path

import trl.trainer.grpo_trainer

from trl_gspo import metrics as names

ROOT = Path(__file__).resolve().parents[2]
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.md"


def docs_hooks():
    """docs/hooks.py, the site's page generator (a file of the site, not a package)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_page_is_the_registry():
    """The site's metrics page shows, for each origin, exactly the registry's keys with the registry's definitions
    (generated at build time), and the README links to it."""
    page = docs_hooks().generated_markdown(METRICS_PAGE.read_text())
    for origin in (names.GSPO, names.TRL, names.TRANSFORMERS):
        assert page.count(names.markdown_table(origin)) == 1, f"docs/reference/metrics.md lacks the {origin} table"
    listed = re.findall(r"^\| `([^`]+)` \|", page, re.M)
    assert [key for pattern in listed for key in names.expand(pattern)] == [
        key for origin in (names.GSPO, names.TRL, names.TRANSFORMERS) for key in names.keys(origin)
    ]
    assert "](docs/reference/metrics.md)" in (ROOT / "README.md").read_text(), "the README must link the metrics page"


def test_registry_entries_render_as_table_cells():
    for metric in names.METRICS:
        assert metric.origin in (names.GSPO, names.TRL, names.TRANSFORMERS), metric.key
        for text in (metric.key, metric.logged, metric.definition):
            assert text and "|" not in text and "\n" not in text, metric.key


def test_registry_covers_every_key_grpo_trainer_logs():
    """Each `_metrics[mode][...]` key in TRL's GRPOTrainer source (an f-string's fields as one path segment) is a
    registry key of origin TRL: a TRL upgrade that adds or renames one fails here."""
    source = Path(trl.trainer.grpo_trainer.__file__).read_text()
    found = re.findall(r'_metrics\[[^\]]+\]\[(f?)"([^"]+)"\]', source)
    assert len(found) > 30, "the pattern no longer finds TRL's metric keys"
    missing = []
    for is_fstring, key in found:
        key = re.sub(r"\{[^}]+\}", "x", key) if is_fstring else key
        metric = names.find(key)
        if metric is None or metric.origin != names.TRL:
            missing.append(key)
    # `self._metrics[mode][name]` with a variable: TRL's log_metric names, chosen by reward functions
    assert not missing, f"GRPOTrainer logs keys the registry lacks: {missing}"


def test_registry_patterns():
    assert names.expand("gspo/seq_ratio/{min,max}") == ["gspo/seq_ratio/min", "gspo/seq_ratio/max"]
    assert names.find("rewards/exact_match/mean").origin == names.TRL
    assert names.find("eval_gspo/seq_ratio/std").key == "gspo/seq_ratio/{mean,std,min,max}"
    assert names.find("rewards/a/b/mean") is None and names.find("gspo/seq_ratio/median") is None
    keys = [key for metric in names.METRICS for key in names.expand(metric.key)]
    assert len(keys) == len(set(keys)), "a key is registered twice"
    # every name constant is a registered key or the prefix of some
    constants = {
        value for name, value in vars(names).items() if name.isupper() and name[0] != "_" and isinstance(value, str)
    }
    for constant in constants - {names.GSPO, names.TRL, names.TRANSFORMERS}:
        assert names.find(constant) or any(key.startswith(constant + "/") for key in keys), constant
