"""The whole CLI through real commands (click's CliRunner), errors included."""

import json
import subprocess
import sys

import click
import h5py
import pytest
from click.testing import CliRunner
from conftest import tiny_extract_args

from featcache.cli import main


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_the_cli_starts_without_the_methods_libraries():
    """`featcache --help` imports neither torch nor faiss, scikit-learn or h5py: a command
    imports what it runs when it runs (its --help too, to show the method's defaults)."""
    code = (
        "import sys\n"
        "from featcache.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'faiss', 'sklearn', 'h5py', 'transformers', 'timm')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "main(['probe', '--help'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[]" in r.stdout.splitlines()
    assert "--lr FLOAT" in r.stdout and "[default: 0.5]" in r.stdout  # read from ProbeConfig


@pytest.fixture
def store(run, image_folder, tmp_path):
    out = tmp_path / "tiny.h5"
    r = run(*tiny_extract_args(image_folder, out, "--batch-size", 8))
    assert r.exit_code == 0, r.output
    assert "extracted 48 images" in r.output and "images/s" in r.output
    return out


def test_backbones_lists_the_registry(run):
    r = run("backbones")
    assert r.exit_code == 0
    from featcache.backbones import available_backbones

    for name in available_backbones():
        assert f"\n{name} " in f"\n{r.output}", name
    assert "cls_last4:1536" in r.output and "cls_patch:768" in r.output
    assert "timm:NAME" in r.output and "hf:NAME" in r.output  # the two prefixes, explained


def test_extract_probe_knn_info(run, store, tmp_path):
    r = run(
        "probe",
        "--store",
        store,
        "--json",
        tmp_path / "p.json",
        "--plot",
        tmp_path / "p.png",
        "--epochs",
        "20",
    )
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["test"]["top1"] == 100.0  # the tiny dataset's classes differ in colour
    assert set(p["test"]) == {"top1", "top3", "loss", "mean_per_class", "top1_ci95"}
    assert "weight_decay" in p["selected"] and p["epochs"][0]["train"]["top3"] >= 0
    assert p["views"] == 1
    assert p["fingerprint"] == h5py.File(store, "r").attrs["fingerprint"]
    assert p["store"] == str(store) and "store" not in p["config"]  # configs: methods only
    assert (tmp_path / "p.png").stat().st_size > 1000

    r = run(
        "knn",
        "--store",
        store,
        "--k",
        "1,5",
        "--json",
        tmp_path / "k.json",
        "--features",
        "maxpool",
    )
    assert r.exit_code == 0, r.output
    k = json.loads((tmp_path / "k.json").read_text())
    assert [x["k"] for x in k["results"]] == [1, 5]
    assert k["results"][0]["top1"] == 100.0 and k["features"] == "maxpool"
    assert k["config"]["temperature"] == 0.07

    r = run("info", store)
    assert r.exit_code == 0 and "test-tiny" in r.output and "split train  36 samples" in r.output
    r = run("info", store, "--json")
    assert json.loads(r.output)["sizes"] == {"train": 36, "test": 12}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["extract", "--backbone", "dino-vitz16", "--dataset", "cifar10", "--out", "x.h5"],
            "did you mean dino-vits16",
        ),
        (
            [
                "extract",
                "--backbone",
                "test-tiny",
                "--dataset",
                "imagefolder:/no/such/dir",
                "--out",
                "x.h5",
            ],
            "does not exist",
        ),
        (
            [
                "extract",
                "--backbone",
                "test-tiny",
                "--dataset",
                "imagefolder:{images}",
                "--out",
                "{tmp}/missing/x.h5",
            ],
            "create it first",
        ),
        (
            [
                "extract",
                "--backbone",
                "test-tiny",
                "--dataset",
                "imagefolder:{images}",
                "--out",
                "{tmp}/x.h5",
                "--per-class",
                "100",
            ],
            "fewer than the 100 per class",
        ),
        (["probe", "--store", "{tmp}/none.h5"], "does not exist"),
        (["knn", "--store", "{store}", "--features", "cls"], "no feature set 'cls'"),
        (["knn", "--store", "{store}", "--k", "1000"], "exceeds the 36 training samples"),
        (["probe", "--store", "{store}", "--features", "nope"], "pass --features"),
    ],
)
def test_bad_input_is_one_clear_line(run, store, image_folder, tmp_path, args, message):
    args = [a.format(images=image_folder, tmp=tmp_path, store=store) for a in args]
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_store_without_the_asked_split(run, image_folder, tmp_path):
    out = tmp_path / "train_only.h5"
    assert run(*tiny_extract_args(image_folder, out, "--splits", "train")).exit_code == 0
    r = run("knn", "--store", out, "--k", "1")
    assert r.exit_code == 1 and "has no 'test' split" in r.output


def test_cluster_and_label_efficiency_commands(run, store, tmp_path):
    r = run("cluster", "--store", store, "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["clusters"] == 3 and c["accuracy"] == 100.0 and c["nmi"] == pytest.approx(100.0)

    r = run(
        "probe",
        "--store",
        store,
        "--shots",
        "1,4",
        "--label-fraction",
        "0.5",
        "--repeats",
        "2",
        "--epochs",
        "20",
        "--json",
        tmp_path / "s.json",
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert [(x["kind"], x["labels_per_class"]) for x in s["results"]] == [
        ("shots", 1),
        ("shots", 4),
        ("fraction", 6),
    ]
    for x in s["results"]:
        assert len(x["probe_top1"]) == 2 and len(x["knn_top1"]) == 2
        assert x["probe_top1_mean"] >= 90  # colour classes: even one shot is enough
    r = run("probe", "--store", store, "--shots", "13")
    assert r.exit_code == 1 and "fewer than 13 shots" in r.output


# Options that are not a field of their command's config, and why.
NOT_FIELDS = {
    "extract": {
        "per_class": "sets train_per_class and test_per_class",
        "split_patterns": "part of the dataset spec (wds:SPLIT=PATTERN;...)",
        "json_out": "output",
    },
    "probe": {
        "store": "input",
        "features": "input",
        "json_out": "output",
        "plot": "output",
        "shots": "switches to the shots method (its field)",
        "label_fractions": "the same",
        "repeats": "the shots method's field",
    },  # fmt: skip
    "knn": {"store": "input", "features": "input", "json_out": "output"},
    "cluster": {"store": "input", "features": "input", "json_out": "output"},
    "retrieval": {"store": "input", "features": "input", "json_out": "output"},
    "attention": {
        "store": "input",
        "backbone": "input",
        "weights": "input",
        "images": "input",
        "out": "output",
    },  # fmt: skip
    "report": {},
    "simclr": {},
    "export": {"store": "input", "out": "output"},
    "similarity": {"sets": "input", "json_out": "output", "plot": "output"},
    "zeroshot": {"store": "input", "json_out": "output"},
}
# Config fields without an option, and why.
NO_OPTION: dict[str, dict] = {}


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield name, cmd


def test_every_option_is_its_config_field_by_name_and_default():
    """One vocabulary: an option is named after its config field (``--max-epochs`` for
    ``max_epochs``; older spellings are aliases) and its default is the field's, written
    only there."""
    import dataclasses

    from featcache.cli import CONFIGS, config_class

    walked = set()
    for name, cmd in _commands(main):
        if name not in CONFIGS:
            continue
        walked.add(name)
        fields = {f.name: f for f in dataclasses.fields(config_class(name))}
        ctx = click.Context(cmd)
        options = {p.name: p for p in cmd.params}
        for param_name, param in options.items():
            if param_name in NOT_FIELDS[name]:
                continue
            assert param_name in fields, f"{name} --{param_name} is no field of its config"
            if isinstance(param, click.Argument):  # report's stores: the command's arguments
                continue
            flag = "--" + param_name.replace("_", "-")
            assert flag in param.opts, (name, param.opts)
            f = fields[param_name]
            if f.default is dataclasses.MISSING:  # a field without default: a required option
                assert param.required, (name, param_name)
                continue
            want = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            assert param.get_default(ctx) == want, (name, param_name)
        missing = set(fields) - set(options) - set(NO_OPTION.get(name, {}))
        assert not missing, f"{name}: fields without an option: {missing}"
    assert walked == set(CONFIGS) - {"shots"}  # shots runs as probe --shots
