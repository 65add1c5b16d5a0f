"""metrics.jsonl survives the way runs end: killed mid-write, then resumed."""

import json

import pytest

from jaxpar.train.metrics import MetricsWriter, read_metrics


def test_resume_drops_a_torn_last_line_and_the_steps_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "lo')  # SIGKILL in the middle of writing step 4
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert read_metrics(str(path)) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 0.5},
    ]


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError):
        read_metrics(str(path))
