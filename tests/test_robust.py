"""The debiasing methods, each on a constructed case: train_vit.py's Group DRO weights, inverse-frequency
reweighting, subsampling and upsampling; robust.py's JTT error set, DFR head and side-by-side table; Group DRO's
resume."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import metrics
import model
import robust
import train_vit
from conftest import VIT_TINY, error_line, read_log, run_vit, weights

TINY = [*VIT_TINY, "--loss=ce"]


def run(tiny_data, out_dir, *args):
    run_vit(tiny_data, out_dir, "--loss=ce", *args)


def config(**kw):
    return train_vit.SimpleNamespace(**{"train_groups": "", "sampler": "random", "seed": 0, **kw})


# cells (label, group) label-major: 6 x (0, 0), 2 x (0, 1), 3 x (1, 0), 1 x (1, 1)
LABELS = torch.tensor([0] * 8 + [1] * 4)
GROUPS = torch.tensor([0] * 6 + [1] * 2 + [0] * 3 + [1] * 1)


# -----------------------------------------------------------------------------
# Group DRO (Sagawa et al. 2020)

def test_group_dro_step_by_hand():
    per_sample = torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0])
    cell = torch.tensor([0, 0, 1, 1, 3])  # cell 2 is absent from this batch: its loss counts as 0
    q0 = torch.full((4,), 0.25)
    loss, q = train_vit.group_dro_loss(per_sample, cell, q0, step=0.1, adjust=torch.zeros(4))
    cell_loss = torch.tensor([2.0, 2.0, 0.0, 4.0])  # each cell's mean loss in the batch
    expected_q = q0 * torch.exp(0.1 * cell_loss)
    expected_q /= expected_q.sum()
    assert torch.allclose(q, expected_q) and math.isclose(q.sum().item(), 1.0, rel_tol=1e-6)
    assert loss.item() == pytest.approx((expected_q @ cell_loss).item() * 5, rel=1e-6)  # x batch: loss_fn's scale
    # the adjustment C / sqrt(n_cell) enters the weights' update, not the loss the model descends
    adjust = 1.0 / torch.tensor([100.0, 100.0, 100.0, 4.0]).sqrt()
    _, q_adj = train_vit.group_dro_loss(per_sample, cell, q0, step=0.1, adjust=adjust)
    assert q_adj[3] > q[3] and torch.allclose(q_adj[:3] / q_adj[0], q[:3] / q[0])


def test_group_dro_weights_move_to_the_worst_cell():
    # a fixed batch where cell 3 (label 1, men) has the largest loss: its weight grows every step towards 1
    torch.manual_seed(0)
    cell = torch.arange(4).repeat_interleave(8)
    per_sample = torch.tensor([0.2, 0.4, 0.6, 1.5]).repeat_interleave(8) + 0.05 * torch.rand(32)
    q, history = torch.full((4,), 0.25), []
    for _ in range(200):
        _, q = train_vit.group_dro_loss(per_sample, cell, q, step=0.05, adjust=torch.zeros(4))
        history.append(q[3].item())
    assert all(b > a for a, b in zip(history, history[1:])) and history[-1] > 0.99
    assert q.argmax() == 3 and q[0] < q[1] < q[2]


def test_group_dro_gradient_is_the_weighted_cell_loss():
    # the model descends sum_cell q_cell * mean loss of the cell (times the batch), with q the updated weights
    logits = torch.randn(10, 2, requires_grad=True)
    y, g = torch.tensor([0, 1] * 5), torch.tensor([0] * 6 + [1] * 4)
    cell = 2 * y + g
    loss, q = train_vit.group_dro_loss(F.cross_entropy(logits, y, reduction="none"), cell, torch.full((4,), 0.25),
                                       step=0.3, adjust=torch.zeros(4))
    (grad,) = torch.autograd.grad(loss, logits)
    ce = F.cross_entropy(logits, y, reduction="none")
    reference = sum(q[k] * ce[cell == k].mean() for k in range(4) if (cell == k).any()) * 10
    (expected,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_group_dro_resume_is_exact_and_logs_the_weights(tiny_data, tmp_path):
    args = ["--loss=group_dro", "--dro_step=0.5", "--dro_adjust=1"]
    run(tiny_data, tmp_path / "ref", *args)
    log = read_log(tmp_path / "ref")
    assert len(log) == 2 and all(set(h["dro_weights"]) == {"0 / women", "0 / men", "1 / women", "1 / men"}
                                 for h in log)
    assert all(sum(h["dro_weights"].values()) == pytest.approx(1.0) for h in log)
    assert log[0]["dro_weights"] != log[1]["dro_weights"] != {k: 0.25 for k in log[0]["dro_weights"]}
    _, _, state = model.load_checkpoint(str(tmp_path / "ref" / "last.safetensors"))
    assert state["dro_q"].tolist() == pytest.approx(list(log[1]["dro_weights"].values()))
    run(tiny_data, tmp_path / "cut", *args, "--stop_after=1")
    run(tiny_data, tmp_path / "cut", *args, "--resume=true")
    assert read_log(tmp_path / "cut") == log  # the weights came back with the resume state: the same epoch 2
    a, b = weights(tmp_path / "ref" / "last.safetensors"), weights(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# reweighting and the samplers (Idrissi et al. 2022)

def test_inverse_cell_weights():
    w = train_vit.inverse_cell_weights(LABELS, GROUPS, 4, 2)
    assert w.tolist() == pytest.approx([12 / (4 * 6), 12 / (4 * 2), 12 / (4 * 3), 12 / (4 * 1)])
    per_sample = w[2 * LABELS + GROUPS]
    assert per_sample.mean().item() == pytest.approx(1.0)  # the loss keeps its scale
    totals = torch.zeros(4).index_add_(0, 2 * LABELS + GROUPS, per_sample)
    assert torch.allclose(totals, totals[0].expand(4))  # every cell weighs the same in all
    # an empty cell gets weight 0, the others share the weight evenly
    assert train_vit.inverse_cell_weights(LABELS[:8], GROUPS[:8], 4, 2).tolist() == pytest.approx([8 / 12, 2.0, 0, 0])


def test_subsample_gives_equal_cells_redrawn_each_epoch():
    labels, groups = torch.tensor([0] * 50 + [1] * 10), torch.tensor([0] * 30 + [1] * 20 + [0] * 7 + [1] * 3)
    c = config(sampler="subsample")
    draws = [train_vit.train_indices(c, labels, groups, epoch) for epoch in range(3)]
    for idx in draws:
        assert torch.bincount(2 * labels[idx] + groups[idx], minlength=4).tolist() == [3, 3, 3, 3]
        assert len(set(idx.tolist())) == 12  # without replacement
    assert set(draws[0][9:].tolist()) == set(range(57, 60))  # the smallest cell is whole every epoch
    assert draws[0].tolist() != draws[1].tolist()  # a new draw of the larger cells each epoch ...
    assert train_vit.train_indices(c, labels, groups, 1).tolist() == draws[1].tolist()  # ... fixed by (seed, epoch)
    women = train_vit.train_indices(config(sampler="subsample", train_groups="0"), labels, groups)
    assert torch.bincount(2 * labels[women] + groups[women], minlength=4).tolist() == [7, 0, 7, 0]


def test_subsample_run_draws_each_epoch_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    real, seen = data.make_loader, []

    def spy(data_dir, split, *args, **kwargs):  # the sample indices of every training loader
        if split == "train" and kwargs.get("train"):
            seen.append(kwargs["indices"])
        return real(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(data, "make_loader", spy)
    run(tiny_data, tmp_path / "ref", "--sampler=subsample")
    labels, groups = data.load_labels(tiny_data, "train")
    expected = [train_vit.train_indices(config(sampler="subsample"), labels, groups, epoch) for epoch in (0, 1)]
    assert [t.tolist() for t in seen] == [t.tolist() for t in expected]
    run(tiny_data, tmp_path / "cut", "--sampler=subsample", "--stop_after=1")
    run(tiny_data, tmp_path / "cut", "--sampler=subsample", "--resume=true")
    assert read_log(tmp_path / "cut") == read_log(tmp_path / "ref")
    a, b = weights(tmp_path / "ref" / "last.safetensors"), weights(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_of_the_methods():
    cfg = train_vit.parse_config(["--group_weights=inverse", "--sampler=subsample"])
    assert cfg["group_weights"] == "inverse" and cfg["sampler"] == "subsample"
    cpu, gpu = robust.parse_config(["--config=robust"]), robust.parse_config(["--config=robust_gpu"])
    assert (cpu["select"], cpu["init"], cpu["data_dir"]) == ("worst_group", "scratch", "data/robust")
    assert (gpu["select"], gpu["init"], gpu["img_size"], gpu["loss"]) == ("worst_group", "dino", 80, "ce")
    for main, args, message in [
            (train_vit.main, ["--group_weights=inverted"], "--group_weights=inverted is not a float"),
            (train_vit.main, ["--loss=group_dro", "--group_weights=inverse"], "loss=group_dro weighs the cells itself"),
            (train_vit.main, ["--dro_step=-1"], "--dro_step=-1.0: must be >= 0"),
            (train_vit.main, ["--jtt_epochs=1"], "unknown key --jtt_epochs"),  # robust.py's, not the recipe's
            (robust.main, ["--jtt_epochs=1", "--sampler=balanced"], "upsamples its error set itself"),
            (robust.main, ["--jtt_up=0"], "--jtt_up=0: must be >= 1"),
            (robust.main, ["--table=big"], "--table=big is not one of: , robust")]:
        assert message in error_line(main, args)
    assert "--loss=" in robust.configurator.help_text(robust.DEFAULTS, (robust.__file__, train_vit.__file__), {}, {},
                                                       {}).split("--dfr=")[0]  # the recipe's keys, with their help


# -----------------------------------------------------------------------------
# JTT (Liu et al. 2021)

def test_upsample_repeats_exactly_the_listed_samples(tmp_path):
    errors = torch.tensor([3, 10, 11])
    idx = train_vit.train_indices(config(), LABELS, GROUPS, upsample=(errors, 5))
    counts = torch.bincount(idx, minlength=12)
    assert counts[errors].tolist() == [5, 5, 5] and (counts[[i for i in range(12) if i not in (3, 10, 11)]] == 1).all()
    women = train_vit.train_indices(config(train_groups="0"), LABELS, GROUPS, upsample=(errors, 5))
    assert torch.bincount(women, minlength=12)[errors].tolist() == [5, 5, 0]  # 11 is a man: out of the run
    path = tmp_path / "up.json"
    path.write_text(json.dumps({"indices": [3, 10, 11], "times": 5}))
    read = train_vit.read_upsample(str(path), 12)
    assert read[0].tolist() == [3, 10, 11] and read[1] == 5
    for text, message in [("{", "not a readable JSON file"), ('{"indices": [3]}', "'times'"),
                          ('{"indices": [12], "times": 2}', "every index in 0..11"),
                          ('{"indices": [1], "times": 0}', "times must be >= 1")]:
        path.write_text(text)
        with pytest.raises(train_vit.UserError, match=message):
            train_vit.read_upsample(str(path), 12)
    with pytest.raises(train_vit.UserError, match="not a readable JSON file"):
        train_vit.read_upsample(str(tmp_path / "missing.json"), 12)


def test_jtt_error_set_is_the_misclassified_train_samples(tiny_data, tmp_path, monkeypatch):
    real, train_sets = data.make_loader, []

    def spy(data_dir, split, *args, **kwargs):  # the sample indices of every training loader
        if split == "train" and kwargs.get("train"):
            train_sets.append(kwargs.get("indices"))
        return real(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(data, "make_loader", spy)
    robust.main([*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--jtt_epochs=1", "--jtt_up=4", "--epochs=1"])
    saved = json.loads((tmp_path / "jtt_errors.json").read_text())
    # recompute independently: the identification run's last checkpoint on the unaugmented train images
    net, meta, _ = model.load_checkpoint(str(tmp_path / "jtt_id" / "last.safetensors"))
    assert meta["epoch"] == 1 and meta["config"]["upsample"] == ""
    x, y, g = data.load_split(tiny_data, "train")
    with torch.no_grad():
        pred = net.eval()(data.prepare(x, 32)).argmax(1)
    assert saved["indices"] == torch.nonzero(pred != y).flatten().tolist() and saved["n_errors"] > 0
    assert saved["n_train"] == len(y) and sum(saved["errors_per_cell"].values()) == saved["n_errors"]
    assert saved["times"] == 4
    # the identification run read the split as it is; the final run every sample once and each error 4 times
    assert len(train_sets) == 2 and train_sets[0] is None
    counts = torch.bincount(train_sets[1], minlength=len(y))
    assert counts[saved["indices"]].eq(4).all() and counts.sum() == len(y) + 3 * saved["n_errors"]
    assert len(read_log(tmp_path)) == 1 and len(read_log(tmp_path / "jtt_id")) == 1
    _, final, _ = model.load_checkpoint(str(tmp_path / "last.safetensors"))
    assert final["config"]["upsample"] == str(tmp_path / "jtt_errors.json")  # stage 2 is a plain recipe run


def test_jtt_refuses_an_earlier_run_before_its_first_stage(tiny_data, tmp_path):
    run(tiny_data, tmp_path)
    message = error_line(robust.main, [*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--jtt_epochs=1"])
    assert "holds an earlier run" in message and not (tmp_path / "jtt_id").exists()


# -----------------------------------------------------------------------------
# DFR (Kirichenko et al. 2023)

def test_fit_head_matches_sklearn_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    y = ((x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.8 * torch.randn(200, generator=gen)) > 0).long()
    C = 0.5
    W, b = robust.fit_head(x, y, l2=1 / (C * len(y)))  # sklearn: |w|^2 / 2 + C * summed loss
    ref = linear_model.LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert torch.allclose(W[1] - W[0], torch.tensor(ref.coef_[0]).double(), atol=1e-4)
    assert (b[1] - b[0]).item() == pytest.approx(ref.intercept_[0], abs=1e-4)


def scored_on_test(run_dir, data_dir):
    """train_vit.py's test metrics of a run's best.safetensors (what the sweep and the table report)."""
    c = train_vit.SimpleNamespace(data_dir=data_dir, eval_batch_size=64)
    return train_vit.metrics_on_test(str(run_dir), c, torch.device("cpu"))


def spurious_features(n, p_majority, gen):
    """features [n, 2]: a weak core feature (the label plus noise) and a strong spurious one (the group, which
    agrees with the label on a p_majority share); cells: label x group."""
    y = (torch.rand(n, generator=gen) < 0.5).long()
    g = torch.where(torch.rand(n, generator=gen) < p_majority, y, 1 - y)
    core = (2 * y - 1) + 1.0 * torch.randn(n, generator=gen)
    spurious = 3 * (2 * g - 1) + 0.3 * torch.randn(n, generator=gen)
    return torch.stack([core, spurious], 1) * torch.tensor([1.0, 10.0]) + 5, y, g


def test_dfr_head_fits_balanced_cells_and_fixes_the_worst_cell():
    gen = torch.Generator().manual_seed(0)
    val, test = spurious_features(2000, 0.97, gen), spurious_features(4000, 0.5, gen)
    worst = lambda W, b: min(metrics.cell_accuracies((test[0].double() @ W.T + b).argmax(1), test[1],
                                                     test[2]).values())
    # a head fitted on all of val (its cells as skewed as the train set's) leans on the group feature
    z = (val[0] - val[0].mean(0)) / val[0].std(0)
    W_all, b_all = robust.fit_head(z, val[1], l2=1e-3)
    W_all, b_all = W_all / val[0].std(0).double(), b_all - (W_all / val[0].std(0).double()) @ val[0].mean(0).double()
    W, b, info = robust.dfr_head(*val, seed=0)
    smallest = min(torch.bincount(2 * val[1] + val[2], minlength=4)).item()
    assert info["n_fit"] == 4 * smallest and info["l2"] in robust.DFR_L2 and info["fits"] == robust.DFR_FITS
    assert worst(W_all, b_all) < 0.5 < 0.7 < worst(W, b)
    assert abs(W[1, 0] - W[0, 0]) * 3 > abs(W[1, 1] - W[0, 1]) * 0.3  # the core feature carries weight


def test_dfr_refits_only_the_head(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "erm")
    base = tmp_path / "erm" / "last.safetensors"
    test = robust.run_dfr({**robust.parse_config([*TINY, f"--data={tiny_data}"]), "dfr": str(base),
                           "out_dir": str(tmp_path / "dfr")})
    before, after = weights(base), weights(tmp_path / "dfr" / "best.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["head.weight", "head.bias"]
    _, meta, state = model.load_checkpoint(str(tmp_path / "dfr" / "best.safetensors"))
    assert meta["dfr"]["from"] == str(base) and state is None and meta["data"]["path"] == tiny_data
    # the saved checkpoint scores on test what run_dfr reported (float32 head vs the float64 fit)
    rescored = scored_on_test(tmp_path / "dfr", tiny_data)
    assert rescored["accuracy"] == pytest.approx(test["accuracy"], abs=1 / 40)
    log = read_log(tmp_path / "dfr")
    assert len(log) == 1 and log[0]["test"]["accuracy"] == test["accuracy"] and log[0]["l2"] in robust.DFR_L2
    # a second DFR into the same folder: refused, as any run
    message = error_line(robust.main, [*TINY, f"--data={tiny_data}", f"--dfr={base}", f"--out_dir={tmp_path / 'dfr'}"])
    assert "holds an earlier run" in message


# -----------------------------------------------------------------------------
# the table

def test_robust_table_runs_every_row_and_writes_mean_and_std(tiny_data, tmp_path, monkeypatch):
    rows = [r for r in robust.TABLE if r[1] in ("erm", "dfr")]
    monkeypatch.setattr(robust, "TABLE", tuple(rows))
    robust.main([*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--table=robust", "--table_seeds=2",
                    "--epochs=1", "--select=worst_group"])
    assert sorted(os.listdir(tmp_path)) == ["dfr_s0", "dfr_s1", "erm_s0", "erm_s1", "robust_table.md"]
    table = (tmp_path / "robust_table.md").read_text()
    header = "| method | worst group | average | fair | EO difference | minutes |"
    assert header in table and "--table=robust" in table and "seeds 0, 1" in table
    for row, _, _ in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert line.count("±") == 4
    erm = [scored_on_test(tmp_path / f"erm_s{s}", tiny_data) for s in (0, 1)]
    mean = sum(m["worst_group_accuracy"] for m in erm) / 2
    assert f"| ERM | {mean:.4f} ± " in table
