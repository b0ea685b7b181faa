"""ALPS on a tiny model with a tiny step budget (one gain per layer, cache, shards), the frontier
end to end, and the `lowbit mixed` command (digits, 1x8x8)."""

import json

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.checkpoint import save_checkpoint
from lowbit.cli import main
from lowbit.data import make_loader
from lowbit.errors import RecipeError
from lowbit.mixed import ALPS, build_space, run_alps, run_frontier
from lowbit.mixed import alps as alps_module
from lowbit.mixed.alps import alps_gains
from lowbit.zoo import create_model

torch.set_num_threads(1)
EXAMPLE = torch.zeros(1, 1, 8, 8)


def quiet(_msg):
    pass


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.conv_a(F.relu(self.stem(x))))
        return self.head(F.relu(self.conv_b(x)).flatten(1))


@pytest.fixture(scope="module")
def data():
    return {"train": make_loader("digits", "train", 64, shuffle=True),
            "calib": make_loader("digits", "calib", 90),
            "test": make_loader("digits", "test", 180)}


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(2):
        data["train"].set_epoch(epoch)
        for x, y in data["train"]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def counted(monkeypatch):
    """Count ALPS's fine-tunes."""
    calls = []
    real = alps_module.short_finetune

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(alps_module, "short_finetune", counting)
    return calls


def test_alps_one_gain_per_layer_and_cached_rerun(tmp_path, data, trained, counted):
    space = build_space(trained, "lsq-w4a4", example_input=EXAMPLE)
    kw = {"steps": 2, "calib_data": data["calib"], "cache_dir": tmp_path, "log": quiet}
    res = run_alps(trained, space, data["train"], data["calib"], **kw)
    assert res.complete and not res.missing
    assert list(res.gains) == space.candidates == ["conv_a", "conv_b"]
    for n in space.candidates:
        assert len(res.gains[n]) == 2 and res.gains[n][1] == 0.0
        assert res.gains[n][0] == pytest.approx(res.base_accuracy - res.accuracies[n]["w2a2"])
    assert len(counted) == res.trained_now == res.runs == 3 and res.steps_total == 6
    assert res.drops() == {n: res.gains[n][0] for n in space.candidates}
    assert json.loads(next((tmp_path).glob("alps-*/base.json")).read_text())["steps"] == 2

    counted.clear()
    again = run_alps(trained, space, data["train"], data["calib"], **kw)
    assert counted == [] and again.trained_now == 0
    assert again.gains == res.gains and again.seconds_total == res.seconds_total

    other = ALPS(trained, space, data["train"], data["calib"], steps=3, calib_data=data["calib"], cache_dir=tmp_path)
    assert other.key() != ALPS(trained, space, data["train"], data["calib"], **kw).key()  # budget in the key


def test_alps_shards_share_the_work(tmp_path, data, trained, counted):
    space = build_space(trained, "lsq-w4a4", example_input=EXAMPLE)
    kw = {"steps": 1, "calib_data": data["calib"], "cache_dir": tmp_path, "log": quiet}
    first = run_alps(trained, space, data["train"], data["calib"], shard="0/2", **kw)
    assert not first.complete and first.trained_now == 2 and len(first.missing) == 1
    with pytest.raises(RecipeError, match="shard"):
        alps_gains(first)
    second = run_alps(trained, space, data["train"], data["calib"], shard=(1, 2), **kw)
    assert second.complete and second.trained_now == 1
    counted.clear()
    final = run_alps(trained, space, data["train"], data["calib"], **kw)
    assert counted == [] and final.gains == second.gains
    unsharded = run_alps(trained, space, data["train"], data["calib"], **{**kw, "cache_dir": tmp_path / "one"})
    assert unsharded.gains == final.gains  # each run is seeded on its own: same numbers in any split


def test_frontier_end_to_end(tmp_path, data, trained):
    space = build_space(trained, "lsq-w4a4", example_input=EXAMPLE)
    alps = ALPS(trained, space, data["train"], data["calib"], steps=1, calib_data=data["calib"],
                cache_dir=tmp_path / "cache", log=quiet)
    budget = 0.8
    res = run_frontier(trained, space, method="alps", budgets=[budget], train_data=data["train"],
                       test_data=data["test"], calib_data=data["calib"], steps=1, out_dir=tmp_path / "out",
                       random_draws=2, uniform_bits=(2, 4), alps=alps, additivity=1, model_name="tiny", log=quiet)
    kinds = [p["kind"] for p in res["points"]]
    assert kinds == ["alps", "random", "uniform", "uniform"]
    alps_point, rand = res["points"][0], res["points"][1]
    assert alps_point["cost"] <= budget * space.bounds()[1] and 0 <= alps_point["accuracy"] <= 100
    assert len(rand["draws"]) == 2 and rand["accuracy"] == pytest.approx(
        sum(d["accuracy"] for d in rand["draws"]) / 2)
    assert all(d["cost"] <= alps_point["cost"] for d in rand["draws"])  # random at equal (or lower) cost
    assert len(res["additivity"]["rows"]) == 1
    out = tmp_path / "out"
    for name in ("frontier.json", "frontier.md", "frontier.png", "recipes/alps-0.8.yaml",
                 "recipes/uniform-w2a2.yaml", "recipes/random-0.8-draw1.yaml"):
        assert (out / name).is_file(), name
    assert "uniform w4a4" in (out / "frontier.md").read_text()
    recipe = yaml.safe_load((out / "recipes/alps-0.8.yaml").read_text())
    q = lowbit.quantize(trained, str(out / "recipes/alps-0.8.yaml"))
    assert q.conv_a.weight_quantizer.bits == int(recipe["mixed"]["assignment"]["conv_a"][1])


def test_cli_mixed(tmp_path, capsys):
    weights = tmp_path / "mlp.safetensors"
    save_checkpoint(create_model("mlp", in_size=8), weights)
    common = ["mixed", "--model", "mlp", "--dataset", "digits", "--weights", str(weights), "--out",
              str(tmp_path / "run")]
    assert main(common + ["--budgets", "0.7,1.0", "--select-only"]) == 0
    assert (tmp_path / "run/recipes/eagl-0.7.yaml").is_file()
    assert main(common + ["--budgets", "0.7", "--steps", "1", "--random-draws", "1", "--uniform-bits", "4",
                          "--train-images", "128", "--test-images", "90", "--batch-size", "64"]) == 0
    results = json.loads((tmp_path / "run/frontier.json").read_text())
    assert [p["kind"] for p in results["points"]] == ["eagl", "random", "uniform"]
    assert all("accuracy" in p for p in results["points"]) and results["model"] == "mlp"
    capsys.readouterr()
    assert main(common + ["--budgets", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "feasible range" in err and "Traceback" not in err
    assert main(common + ["--method", "alps", "--shard", "0/2", "--alps-steps", "1", "--train-images", "64",
                          "--budgets", "0.7", "--alps-eval-images", "90", "--batch-size", "64"]) == 0
    assert "1/2 runs" in capsys.readouterr().out
    assert main(common + ["--method", "eagl", "--shard", "0/2"]) == 2


def test_select_precision_alps(tmp_path, data, trained, counted):
    kw = {"example_input": EXAMPLE, "train_data": data["train"], "eval_data": data["calib"],
          "calib_data": data["calib"], "steps": 1, "log": quiet}
    sel = lowbit.select_precision(trained, 0.8, "alps", cache_dir=False, **kw)  # no cache: each run once
    assert len(counted) == 3 and set(sel.gains) == {"conv_a", "conv_b"}
    assert sel.cost <= 0.8 * sel.space.bounds()[1] and sel.info["alps_runs"] == 3
    assert sel.recipe().sections["mixed"]["method"] == "alps"
    with pytest.raises(RecipeError, match="shard"):
        lowbit.select_precision(trained, 0.8, "alps", cache_dir=tmp_path, shard="0/3", **kw)


def test_alps_from_a_quantized_base(tmp_path, data, trained):
    """ALPS lowers layers of copies of a given (e.g. fine-tuned) high-precision model, which stays as it was."""
    space = build_space(trained, "lsq-w4a4", example_input=EXAMPLE)
    base = lowbit.quantize(trained, space.recipe_for(space.uniform(4)), calib_data=data["calib"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    alps = ALPS(trained, space, data["train"], data["calib"], steps=1, base_model=base, cache_dir=tmp_path, log=quiet)
    assert alps.key() != ALPS(trained, space, data["train"], data["calib"], steps=1, cache_dir=tmp_path).key()
    lowered = alps.lowered_model({"conv_b": (2, 2)})
    assert lowered.conv_b.weight_quantizer.bits == 2 and bool(lowered.conv_b.input_quantizer.initialized)
    assert lowered.conv_a.weight_quantizer.bits == 4
    res = alps.run()
    assert res.complete and set(res.gains) == {"conv_a", "conv_b"}
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_score_replaces_top1_and_enters_the_key(tmp_path, data, trained):
    """An encoder has no labels: ALPS measures each run with the caller's score(model, eval_data) instead."""
    space = build_space(trained, "lsq-w4a4", example_input=EXAMPLE)
    seen = []

    def lowered_layers(model, batches):  # higher is better: fewer 2-bit weight quantizers
        seen.append(len(batches))
        return -float(sum(m.weight_quantizer.bits == 2 for m in model.modules()
                          if getattr(m, "weight_quantizer", None) is not None))

    kw = dict(steps=0, calib_data=data["calib"], cache_dir=tmp_path, log=quiet)
    alps = ALPS(trained, space, data["train"], data["calib"], score=lowered_layers, **kw)
    assert alps.key() != ALPS(trained, space, data["train"], data["calib"], **kw).key()
    result = alps.run()
    assert result.base_accuracy == 0.0 and set(result.drops().values()) == {1.0}
    assert seen == [len(data["calib"])] * (1 + len(space.candidates))
