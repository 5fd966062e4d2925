"""deepseek_jax.report: the run summary (PNG / HTML) and the plot helpers used by the notebooks.

The fixture tests/fixtures/run-v3-tiny/metrics.jsonl is the log of a real 8-step run:
`python train_main.py model.preset=v3-tiny model.num_hidden_layers=2 model.vocab_size=264
data.tokenizer=null data.seq_len=32 data.global_batch_size=8 train.steps=8 train.log_every=1
train.warmup_steps=2 model.moe_impl=capacity model.capacity_factor=1.0` (capacity routing, so
the dropped fraction is not zero). tests/train/test_loop.py checks that a live run logs
`expert_load` and its TensorBoard histograms.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from deepseek_jax import report  # needs matplotlib: the `plot` extra, part of the `test` extra
from deepseek_jax.sharding.pipeline_sim import Costs, simulate  # noqa: E402
from deepseek_jax.sharding.schedules import dualpipe_schedule  # noqa: E402

RUN = pathlib.Path(__file__).parent / "fixtures" / "run-v3-tiny"


@pytest.fixture(scope="module")
def records():
    return report.read_metrics(RUN)


def test_read_metrics_keeps_the_last_record_of_a_repeated_step(tmp_path):
    lines = (RUN / "metrics.jsonl").read_text().splitlines()
    resumed = json.loads(lines[4])
    resumed["loss"] = 123.0  # a resumed run logs step 5 again; the later line counts
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(resumed)]) + "\n")
    got = report.read_metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert got[4]["loss"] == 123.0


def test_missing_or_broken_metrics_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        report.read_metrics(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        report.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        report.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        report.read_metrics(tmp_path)


def test_series_match_the_file(records):
    raw = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
    steps, loss = report.series(records, "loss")
    np.testing.assert_array_equal(steps, [r["step"] for r in raw])
    np.testing.assert_array_equal(loss, [r["loss"] for r in raw])
    steps, load = report.layer_series(records, "expert_load")
    assert load.shape == (8, 2, 8)  # steps, MoE layers (the MoE layer + the MTP block), experts
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)  # shares of each layer's load
    # The logged busiest-expert ratio is the largest share times E.
    _, busiest = report.layer_series(records, "expert_load_max")
    np.testing.assert_allclose(load.max(-1) * 8, busiest, rtol=1e-6)


def test_run_figure_has_every_series(records):
    fig, contents = report.run_figure(records, title="tiny")
    assert contents["losses"] == ["loss", "main_loss", "mtp_loss", "seq_balance_loss"]
    assert contents["lr"] == ["lr"] and contents["grad_norm"] == ["grad_norm"]
    assert contents["throughput"] == ["tokens_per_s", "positions_per_s"]  # the run padded
    assert contents["dropped"] == ["dropped/layer_0", "dropped/layer_1"]
    assert contents["load_imbalance"] == ["expert_load_max/layer_0", "expert_load_max/layer_1"]
    assert contents["expert_load_layer_1"] == ["expert_load/layer_1"]
    titles = [ax.get_title() for ax in fig.axes]
    assert "dropped fraction per MoE layer" in titles
    # The heatmap shows the logged shares: rows are experts, columns steps.
    heat = next(ax for ax in fig.axes if ax.get_title().startswith("expert load, MoE layer 1"))
    _, load = report.layer_series(records, "expert_load")
    np.testing.assert_allclose(np.asarray(heat.images[0].get_array()), load[:, 1].T)
    dropped = next(ax for ax in fig.axes if ax.get_title().startswith("dropped"))
    np.testing.assert_allclose(dropped.lines[0].get_ydata(), [r["dropped"][0] for r in records])
    assert max(r["dropped_mean"] for r in records) > 0  # capacity routing dropped something
    report.pyplot().close(fig)


def test_report_command_writes_png_and_html(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    assert report.main([str(run)]) == 0
    png = (run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert report.main([str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "<th>loss</th>" in page
    assert "report written" in capsys.readouterr().out
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\.png or \.html"):
        report.write_report(run, tmp_path / "r.pdf")


def test_pipeline_timeline_and_cache_plots():
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1)
    costs = Costs(1, 2, 1)
    schedule = dualpipe_schedule(4, 8)
    result = report.plot_pipeline_timeline(ax1, schedule, costs)
    assert result == simulate(schedule, costs)
    ops = sum(len(tl) for tl in result.timeline)
    assert len(ax1.collections) == ops  # one bar per op (an F&B pair draws two halves)
    assert report.plot_cache_bytes(ax2, [1024, 2048], {"a": [1.0, 2.0], "b": [3, 4]}) == ["a", "b"]
    np.testing.assert_allclose(ax2.lines[1].get_ydata(), np.array([3, 4]) / 2**30)
    plt.close(fig)
