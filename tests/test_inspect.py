"""bnkit.inspect (the BN doctor) finds planted defects, and only those; its outputs and CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit import cli


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False), bnkit.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5),
    )


DATA = torch.randn(96, 2, 6, 6)


def _healthy(seed=0):
    """Statistics equal to the data's (PreciseBN), so the same data shows no shift at all."""
    m = _model(seed)
    m.train()
    with torch.no_grad():
        for i in range(0, 96, 32):
            m(DATA[i:i + 32])
    bnkit.recalibrate(m, DATA)
    return m.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_healthy_model_has_no_findings():
    rep = bnkit.inspect(_healthy(), DATA)
    assert rep.ok and rep.findings == [] and rep.first_shift is None
    assert [r.name for r in rep.layers] == ["1", "4", "8"]
    assert [r.cls for r in rep.layers] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm1d"]
    assert all(r.shift < 1e-3 and abs(r.log_var_ratio) < 1e-2 for r in rep.layers)
    assert rep.layers[0].num_batches_tracked == 3 and rep.layers[0].momentum == 0.1


@pytest.mark.parametrize("where", [1, 4, 8])
@pytest.mark.parametrize("buffer", ["running_mean", "running_var", "weight"])
def test_planted_nan_is_an_error_at_that_layer_only(where, buffer):
    m = _healthy()
    with torch.no_grad():
        getattr(m[where], buffer)[1] = float("nan")
    rep = bnkit.inspect(m)
    bad = [r for r in rep.layers if r.status == "error"]
    assert [r.name for r in bad] == [str(where)]
    assert bad[0].nonfinite == {buffer: 1} and "nonfinite" in rep.codes(str(where))
    assert not rep.ok
    json.loads(rep.to_json())  # still valid JSON (no NaN literal)


def test_planted_dead_channels():
    m = _healthy()
    with torch.no_grad():
        m[4].weight[[0, 3]] = torch.tensor([1e-5, -2e-4])
        m[4].weight[5] = 2e-3  # small but alive at the default tolerance
    rep = bnkit.inspect(m)
    assert rep.codes() == {"dead_channels"}
    assert rep.layers[1].dead_channels == [0, 3]
    assert bnkit.inspect(m, dead_tol=1e-2).layers[1].dead_channels == [0, 3, 5]


def test_train_mode_layer_in_an_eval_model_and_vice_versa():
    m = _healthy()
    m[4].train()
    rep = bnkit.inspect(m)
    assert rep.codes() == {"train_in_eval"} and rep.codes("4") == {"train_in_eval"}
    assert rep.layers[1].mode == "train"
    m.train()
    m[1].eval()
    rep = bnkit.inspect(m)
    assert rep.codes() == {"eval_in_train"} and rep.codes("1") == {"eval_in_train"}
    assert rep.ok  # deliberate freezing is information, not a warning


def test_never_updated_negative_and_tiny_variance():
    m = _healthy()
    m[8] = nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        m[1].running_var[0] = -0.5
        m[4].running_var[2] = 1e-7
    rep = bnkit.inspect(m)
    assert rep.codes("8") == {"never_updated"}
    assert rep.codes("1") == {"negative_var"} and rep.layers[0].negative_var == 1
    assert rep.codes("4") == {"tiny_var"} and rep.layers[1].tiny_var == 1


def test_a_shifted_domain_is_flagged_from_its_first_layer():
    m = _healthy()
    shifted = DATA * 3 + 2
    rep = bnkit.inspect(m, [shifted[:50], shifted[50:]])
    assert rep.first_shift == "1" and "domain_shift" in rep.codes("1")
    assert rep.data == {"batches": 2, "samples": 96}
    # the first layer's score, by hand (float64 NumPy): mean |mu - mu_run| / sqrt(var_run + eps) and the log ratio
    x = nn.functional.conv2d(shifted.double(), m[0].weight.detach().double(), padding=1).numpy()
    x = np.moveaxis(x, 1, -1).reshape(-1, 4)
    rm, rv, eps = m[1].running_mean.double().numpy(), m[1].running_var.double().numpy(), m[1].eps
    shift = np.mean(np.abs(x.mean(0) - rm) / np.sqrt(rv + eps))
    ratio = np.mean(np.log((x.var(0, ddof=1) + eps) / (rv + eps)))
    assert rep.layers[0].shift == pytest.approx(shift, rel=1e-5)
    assert rep.layers[0].log_var_ratio == pytest.approx(ratio, rel=1e-5, abs=1e-7)
    # a shift planted deeper is found there
    m2 = _healthy()
    with torch.no_grad():
        m2[4].running_mean += 3.0
    rep2 = bnkit.inspect(m2, DATA)
    assert rep2.first_shift == "4" and rep2.codes() == {"domain_shift"}


def test_inspect_changes_nothing():
    m = _healthy()
    m[4].train()
    state, flags = _state(m), [x.training for x in m.modules()]
    bnkit.inspect(m, iter([DATA[:40], DATA[40:]]))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert [x.training for x in m.modules()] == flags


def test_frozen_per_site_and_stat_free_layers():
    m = nn.Sequential(bnkit.FrozenBatchNorm2d(2), nn.BatchNorm2d(2, track_running_stats=False),
                      bnkit.SharedBatchNorm(2, sites=1))
    rep = bnkit.inspect(m.eval(), DATA)
    assert [r.mode for r in rep.layers] == ["frozen", "eval", "eval"]
    assert rep.layers[0].momentum == "n/a"
    assert rep.codes("1") == {"no_running_stats"}
    assert rep.layers[2].num_batches_tracked == [0]


def test_fuse_column_says_where_each_layer_folds():
    rep = bnkit.inspect(_healthy(), DATA)
    assert [r.fuse for r in rep.layers] == ["into 0 (after)", "into 3 (after)", "into 7 (after)"]
    assert bnkit.inspect(_healthy(), fuse=False).layers[0].fuse is None


def test_outputs_dict_json_text_rich_html(tmp_path):
    m = _healthy()
    with torch.no_grad():
        m[4].weight[1] = 0.0
    rep = bnkit.inspect(m, DATA * 2)
    d = rep.to_dict()
    assert json.loads(rep.to_json()) == json.loads(json.dumps(d))
    assert d["layers"][1]["dead_channels"] == [1] and "dead_channels" in d["layers"][1]["findings"]
    assert {f["code"] for f in d["findings"]} == rep.codes()
    text = str(rep)
    assert all(r.name in text for r in rep.layers) and "dead_channels" in text
    from rich.console import Console

    con = Console(record=True, width=220)
    rep.print(console=con)
    out = con.export_text()
    assert "BatchNorm1d" in out and "dead_channels" in out
    page = rep.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<svg" in page
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    assert "dead_channels" in page and "domain_shift" in page
    assert rep.write_html(tmp_path / "r.html").read_text() == page
    assert json.loads(rep.write_json(tmp_path / "r.json").read_text()) == json.loads(rep.to_json())


def test_bad_arguments():
    with pytest.raises(TypeError):
        bnkit.inspect({"a": 1})
    with pytest.raises(ValueError, match="shift_tol"):
        bnkit.inspect(_model(), shift_tol=-1)
    with pytest.raises(ValueError, match="no batch"):
        bnkit.inspect(_model(), [])


# ------------------------------------------------------------------ CLI
def test_cli_inspect(tmp_path, capsys):
    m = _healthy()
    with torch.no_grad():
        m[1].running_var[0] = float("nan")
    path = tmp_path / "model.pt"
    torch.save(m, path)
    torch.save(DATA * 3 + 2, tmp_path / "x.pt")
    rc = cli.main(["inspect", str(path), "--data", str(tmp_path / "x.pt"), "--json", str(tmp_path / "r.json"),
                   "--html", str(tmp_path / "r.html"), "--batch-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "nonfinite" in out and "BatchNorm1d" in out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["data"] == {"batches": 3, "samples": 96} and not d["ok"]
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    torch.save((DATA, torch.zeros(96, dtype=torch.long)), tmp_path / "xy.pt")
    assert cli.main(["inspect", str(path), "--data", str(tmp_path / "xy.pt"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["samples"] == 96


@pytest.mark.parametrize("case", ["missing", "text", "state_dict", "bad_data", "data_mismatch", "json_dir_missing",
                                  "html_is_dir", "lazy"])
def test_cli_inspect_errors_are_one_line(case, tmp_path, capsys):
    m = _healthy()
    model = tmp_path / "model.pt"
    torch.save(m, model)
    args = ["inspect", str(model)]
    if case == "missing":
        args = ["inspect", str(tmp_path / "nope.pt")]
    elif case == "text":
        (tmp_path / "t.pt").write_text("not a model")
        args = ["inspect", str(tmp_path / "t.pt")]
    elif case == "state_dict":
        torch.save(m.state_dict(), tmp_path / "sd.pt")
        args = ["inspect", str(tmp_path / "sd.pt")]
    elif case == "bad_data":
        args += ["--data", str(tmp_path / "nothing.pt")]
    elif case == "data_mismatch":
        torch.save(torch.randn(4, 3, 6, 6), tmp_path / "x.pt")
        args += ["--data", str(tmp_path / "x.pt")]
    elif case == "json_dir_missing":
        args += ["--json", str(tmp_path / "no" / "r.json")]
    elif case == "html_is_dir":
        args += ["--html", str(tmp_path)]
    elif case == "lazy":  # a model saved before its lazy layer saw an input
        torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.LazyBatchNorm2d()), model)
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("bnkit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert out == ""  # a bad output path is found before the report is made, not after it is printed
    if case == "lazy":
        assert "lazy layer" in err and "'1'" in err


def test_inspect_does_not_hide_the_stdlib_module():
    import inspect as stdlib_inspect

    assert callable(stdlib_inspect.signature) and bnkit.inspect is bnkit.tools.doctor.inspect
    assert copy.copy(bnkit.inspect) is bnkit.inspect
