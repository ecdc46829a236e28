import json
import subprocess
import sys

from common.cli import main


def test_help_is_fast_because_it_imports_nothing_heavy():
    code = (
        "import sys; from common.cli import main; main(['--help']); "
        "print(sorted(m for m in ('torch', 'server', 'flwr') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "distill" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_unknown_command_and_bad_values_fail_cleanly(capsys, tmp_path):
    assert main(["frobnicate"]) == 2
    assert main(["distill", "--method", "random", "--ipc", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and "at least 1" in err


def test_distill_then_evaluate_on_digits(tmp_path, capsys):
    out = tmp_path / "herding"
    assert (
        main(
            [
                "distill",
                "--method",
                "herding",
                "--dataset",
                "digits",
                "--ipc",
                "2",
                "--pipc",
                "20",
                "--feature-steps",
                "10",
                "--out",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "herding" and manifest["num_images"] == 20 and manifest["pipc"] == 20
    assert manifest["options"]["feature_steps"] == 10
    assert main(["distill", "--method", "herding", "--out", str(out), "--no-progress"]) == 2  # no silent overwrite
    assert main(["evaluate", str(out), "--epochs", "5", "--runs", "2", "--no-progress", "--workers", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())["results"][0]
    assert report["arch"] == "convnet3" and report["runs"] == 2 and 0 <= report["mean"] <= 1
    assert json.loads((out / "manifest.json").read_text())["evaluation"]["convnet3@5ep"]["runs"] == 2
    assert "herding" in capsys.readouterr().out
