"""``nemo-dcod score``'s config errors (all at once, each naming its field) and the vocabulary diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.data.vocab import vocabulary_diff
from nemo_dcod.score.config import ScoreConfig


def test_every_problem_is_reported_at_once() -> None:
    bad = [
        "what=teacher_of_teachers",
        "topk=-1",
        "chunk_size=0",
        "trainer.devices=3",
        "parallel.tensor_model_parallel_size=2",
        "trainer.micro_batch_size=0",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(ScoreConfig, None, bad)
    text = str(err.value)
    for needle in (
        "checkpoint: set the NeMo 2 checkpoint",
        "what='teacher_of_teachers': must be one of teacher, reference",
        "topk=-1: must be >= 0",
        "chunk_size=0: must be >= 1",
        "trainer.devices x trainer.num_nodes = 3 is not divisible by TP x PP x CP = 2",
        "trainer.micro_batch_size=0: must be >= 1",
    ):
        assert needle in text, (needle, text)
    assert len(err.value.problems) == 6
    assert ScoreConfig(checkpoint="c", dtype="bf16").problems(has_gpu=False) == [
        "dtype=bf16: needs a GPU (this machine has none); use fp32."
    ]
    assert ScoreConfig(checkpoint="c", dtype="bf16").problems(has_gpu=True) == []
    cfg = load_config(
        ScoreConfig, None, ["checkpoint=c", "trainer.devices=8", "parallel.tensor_model_parallel_size=4"]
    )
    assert cfg.data_parallel_size == 2 and cfg.content_settings() == {
        "what": "teacher",
        "topk": 0,
        "dtype": "fp32",
    }


def test_vocabulary_diff_is_short_and_names_ids() -> None:
    store = {"<pad>": 0, "a": 1, "b": 2, "c": 3}
    assert vocabulary_diff(store, dict(store)) == []
    model = {"<pad>": 0, "b": 1, "a": 2, "c": 3, "d": 4}
    lines = vocabulary_diff(store, model, limit=2)
    assert lines[0] == "sizes: 4 tokens (store) vs 5 (model)"
    assert lines[1] == "3 id(s) map to different tokens, e.g.:"
    assert lines[2:] == ["  id 1: 'a' (store) vs 'b' (model)", "  id 2: 'b' (store) vs 'a' (model)"]


def test_a_forward_that_is_no_log_probability_is_refused_before_it_is_written(tmp_path: Path) -> None:
    """Score checks the columns it computed at the trained positions (NaN from a bf16 overflow)."""
    import numpy as np
    from helpers.trace_fixtures import prepare_store

    from nemo_dcod.data.store import PackedStore
    from nemo_dcod.score.plan import ScoreError
    from nemo_dcod.score.ranks import _check_columns

    store = PackedStore(prepare_store(tmp_path, 64, 209), columns=("tokens", "loss_mask", "segment_ids"))
    trained = np.asarray(store.shard_column(0, "loss_mask")) > 0
    good = np.where(trained, -0.5, 0.0).astype(np.float32)
    _check_columns({"teacher_logprobs": good}, store, 0, "shard_00000")
    bad = good.copy()
    row, pos = (int(i) for i in np.argwhere(trained)[3])
    bad[row, pos] = np.nan
    with pytest.raises(
        ScoreError, match=rf"shard_00000: .*teacher_logprobs = nan at row {row}, position {pos}"
    ):
        _check_columns({"teacher_logprobs": bad}, store, 0, "shard_00000")
    untrained = good.copy()
    untrained[~trained] = np.nan  # garbage where nothing is trained is no one's business
    _check_columns({"teacher_logprobs": untrained}, store, 0, "shard_00000")
