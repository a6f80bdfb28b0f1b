"""helpers.core.identity: what makes two runs the same run, the one definition the study's reuse,
the results layout and fit's resume share."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from helpers.core import config, identity


def test_run_key():
    cfg = config.get_config("fixture")
    key = identity.run_key(cfg, "sha")
    assert len(key) == 12 and int(key, 16) >= 0
    assert identity.run_key(replace(cfg, num_workers=3, device="cpu", embed_batch=7), "sha") == key  # runtime
    assert identity.run_key(replace(cfg, seed=1), "sha") != key
    assert identity.run_key(replace(cfg, crop=False), "sha") != key
    assert identity.run_key(cfg, "other table") != key


def test_the_committed_runs_keep_their_key():
    """The key is the hash the committed study named its run folders with: the config without its
    runtime fields and the table's sha256, as sorted JSON."""
    from helpers.core.files import sha256_bytes

    cfg = config.get_config("demo")
    neutral = identity.LATER_FIELDS  # added since: left out at the value that trains as before
    values = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in config.RUNTIME_FIELDS and not (k in neutral and v == neutral[k])
    }
    text = json.dumps({"config": values, "table": "abc"}, sort_keys=True, default=str)
    assert identity.run_key(cfg, "abc") == sha256_bytes(text.encode())[:12]
    # the re-run's baseline, seed 0, on the demo tree: results/demo/crop/baseline_seed0_0bd9b06b23a5
    table = "ba8a729f2f2aaaea9481432c6c85372a72a6e33f172122f732e13201ff7e49ad"
    assert identity.run_key(cfg, table) == "0bd9b06b23a5"
    # ... and on the first design's tree (500 val items, patience 5):
    # set_aside/interim_400/crop/baseline_seed0_b3f3e84e4ad4
    first = replace(cfg, synthetic_items=800, synthetic_splits=(150, 500, 150), patience=5)
    table = "aebc46065036db0b0a92fe98adb4e24c377ee612a4955e1a102587a14b89aef7"
    assert identity.run_key(first, table) == "b3f3e84e4ad4"
    # the 10-epoch study before it (75 val items, no stop items) kept its key through the later fields
    before = replace(
        cfg,
        synthetic_items=300,
        synthetic_splits=None,
        stop_items=0,
        epochs=10,
        epoch_images=None,
        schedule="constant",
        patience=3,
    )
    table = "dbb9ee2f81900e39a9a87d0a87b437d70aa0fca47540e91556e5e8ed43890222"
    assert identity.run_key(before, table) == "7e2936f6acbb"


def test_differences_as_config_json_stores_them():
    cfg = config.get_config("fixture")
    stored = json.loads(json.dumps(asdict(cfg), default=str))  # tuples come back as lists
    assert identity.differences(stored, "sha", cfg, "sha") == []
    assert identity.differences({**stored, "num_workers": 9}, "sha", cfg, "sha") == []
    found = identity.differences({**stored, "lr": 1.0}, "old", cfg, "sha")
    assert found == [f"lr: 1.0 → {cfg.lr!r}", "table: changed since the run (sha256)"]


def test_a_later_field_at_its_neutral_value_keeps_the_recorded_identity(monkeypatch):
    """A Config field added after runs were recorded: at the value that trains as before, the
    recorded runs keep their keys and a recorded config without it is the same run."""
    cfg = config.get_config("fixture")
    key = identity.run_key(cfg, "sha")
    stored = json.loads(json.dumps(asdict(cfg), default=str))
    monkeypatch.setitem(identity.LATER_FIELDS, "lr", cfg.lr)  # pretend lr came later, at its value
    assert identity.run_key(cfg, "sha") != key  # lr left out of the hash
    assert identity.differences({k: v for k, v in stored.items() if k != "lr"}, "sha", cfg, "sha") == []
    assert identity.differences(stored, "sha", cfg, "sha") == []
    changed = replace(cfg, lr=cfg.lr * 2)
    assert identity.differences(stored, "sha", changed, "sha") == [f"lr: {cfg.lr!r} → {cfg.lr * 2!r}"]
    assert identity.differences({**stored, "lr": cfg.lr * 2}, "sha", cfg, "sha") == [f"lr: {cfg.lr * 2!r} → {cfg.lr!r}"]
