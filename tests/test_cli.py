"""The command line: exit codes, --json, --dry-run, inspect, python -m."""

from __future__ import annotations

import json
import subprocess
import sys

import streammerge
from streammerge import __version__
from streammerge.cli import main


def run(*args, check_rc=None):
    proc = subprocess.run(
        [sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stderr)
    return proc


def test_version_and_help():
    assert run("--version", check_rc=0).stdout.strip() == f"streammerge {__version__}"
    h = run("merge", "--help", check_rc=0).stdout
    assert "exit codes" in h and "130" in h and "examples" in h


def test_a_finished_run_exits_0_even_with_stdout_closed(llama_pair, tmp_path):
    """As under cron or a daemon: the quick exit must not trip over a missing stream."""
    base, ad = llama_pair
    cmd = f"'{sys.executable}' -m streammerge merge '{base}' '{ad}' '{tmp_path / 'o'}' -q >&-"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=False, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "config.json").exists()


def test_usage_errors_exit_2(llama_pair, tmp_path):
    base, ad = llama_pair
    assert run(check_rc=2).returncode == 2
    assert run("merge", base, check_rc=2).returncode == 2
    p = run("merge", base, ad, tmp_path / "o", "--shard-size", "lots", check_rc=2)
    assert "not a size" in p.stderr
    run("merge", base, ad, tmp_path / "o", "--dtype", "int4", check_rc=2)


def test_merge_json_report(llama_pair, tmp_path):
    base, ad = llama_pair
    p = run("merge", base, ad, tmp_path / "out", "--json", "--shard-size", "100KB", check_rc=0)
    rep = json.loads(p.stdout)
    for key in (
        "version",
        "base",
        "adapters",
        "out",
        "options",
        "shards",
        "total_size",
        "modules",
        "seconds",
        "peak_rss_bytes",
        "tensors_merged",
        "warnings",
        "notes",
    ):
        assert key in rep
    assert rep["tensors_merged"] == 6 and len(rep["shards"]) >= 2
    assert sum(s["bytes"] for s in rep["shards"]) == rep["total_size"]
    assert json.loads((tmp_path / "out" / "streammerge_report.json").read_text())["total_size"] == rep["total_size"]


def test_error_exit_1_names_problem(llama_pair, tmp_path):
    base, _ = llama_pair
    p = run("merge", base, tmp_path / "nowhere", tmp_path / "out", check_rc=1)
    assert "adapter directory not found" in p.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(llama_pair, tmp_path):
    base, ad = llama_pair
    p = run("merge", base, ad, tmp_path / "out", "--dry-run", check_rc=0)
    assert "model.layers.0.self_attn.q_proj.weight" in p.stdout and "total:" in p.stdout and "free:" in p.stdout
    assert not (tmp_path / "out").exists()


def test_inspect_checkpoint_and_adapter(llama_pair):
    base, ad = llama_pair
    info = json.loads(run("inspect", base, "--json", check_rc=0).stdout)
    assert info["kind"] == "checkpoint" and info["tensors"] == 21 and len(info["shards"]) > 1
    info = json.loads(run("inspect", ad, "--json", check_rc=0).stdout)
    assert info["kind"] == "adapter" and info["lora_modules"] == 6 and info["r"] == 8
    assert "q_proj" in run("inspect", ad, check_rc=0).stdout


def test_main_in_process_returns_codes(llama_pair, tmp_path, capsys):
    base, ad = llama_pair
    assert main(["merge", str(base), str(ad), str(tmp_path / "o"), "-q"]) == 0
    assert main(["merge", str(base), str(ad), str(tmp_path / "o"), "-q"]) == 1  # exists, not empty
    assert "--overwrite" in capsys.readouterr().err


def test_interrupt_exits_130_and_resumes(llama_pair, tmp_path, monkeypatch, capsys):
    import streammerge.sinks.safetensors as run_mod

    base, ad = llama_pair
    real = run_mod.ShardWriter._advance  # every byte written passes here
    calls = {"n": 0}

    def boom(self, nbytes):
        real(self, nbytes)
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod.ShardWriter, "_advance", boom)
    out = tmp_path / "o"
    args = ["merge", str(base), str(ad), str(out), "-q", "--shard-size", "40KB"]
    assert main(args) == 130
    assert not out.exists()
    assert (tmp_path / ".o.streammerge-partial" / "journal.json").exists()
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(run_mod.ShardWriter, "_advance", real)
    assert main([*args, "--resume", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["resumed_shards"] >= 1
    fresh = tmp_path / "fresh"
    assert main(["merge", str(base), str(ad), str(fresh), "-q", "--shard-size", "40KB"]) == 0
    for f in sorted(fresh.glob("model*")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "o"]


def test_version_inspect_and_dry_run_do_not_import_torch(tmp_path):
    """Start-up: ``--version``, ``--help``, ``inspect`` and ``--dry-run`` read headers and plan without
    torch (importing it takes seconds); a merge imports it on a background thread while planning."""
    import subprocess
    import sys

    from streammerge.synthetic import write_synthetic_llama

    base, ad = write_synthetic_llama(tmp_path, hidden=64, inter=128, layers=2, vocab=128, kv_heads=2, heads=4, shards=2)
    for args in (["--version"], ["--help"], ["inspect", str(base)], ["inspect", str(ad), "--base", str(base)],
                 ["merge", str(base), str(ad), str(tmp_path / "out"), "--dry-run"]):  # fmt: skip
        code = f"import sys; from streammerge.cli import main; main({args!r}); print('torch' in sys.modules)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip().splitlines()[-1] == "False", (args, proc.stdout[-500:], proc.stderr[-2000:])


def test_pass_through_tensors_are_written_before_torch_is_needed(llama_pair, tmp_path, monkeypatch):
    """The executor (and torch with it) is built when the first tensor needs arithmetic: the untouched
    tensors in front of it are handed to the writer first, overlapping torch's background import."""
    import streammerge.api as api_mod
    import streammerge.sinks.safetensors as st

    base, ad = llama_pair
    events = []
    build, advance = api_mod._executor, st.ShardWriter._advance
    monkeypatch.setattr(api_mod, "_executor", lambda *a: events.append("executor") or build(*a))
    monkeypatch.setattr(
        st.ShardWriter, "_advance", lambda self, n: events.append(self._specs[self._i][0]) or advance(self, n)
    )
    rep = streammerge.merge(base, ad, tmp_path / "o")
    first = events.index("executor")
    assert first > 0  # the fixture's adapter targets q_proj, v_proj and down_proj: these are untouched
    assert not any(m in name for name in events[:first] for m in ("q_proj", "v_proj", "down_proj"))
    assert events.count("executor") == 1 and rep.device == "cpu"


def test_command_line_output_is_byte_identical_to_the_api(llama_pair, tmp_path):
    """The command line (torch imported on a background thread, pass-through tensors written before it
    is needed) against the API in a process that has torch already: the same files."""
    base, ad = llama_pair
    run("merge", base, ad, tmp_path / "cli", "-q", "--shard-size", "40KB", check_rc=0)
    streammerge.merge(base, ad, tmp_path / "api", shard_size="40KB")
    names = sorted(p.name for p in (tmp_path / "api").glob("model*"))
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "cli").glob("model*"))
    for n in names:
        assert (tmp_path / "cli" / n).read_bytes() == (tmp_path / "api" / n).read_bytes(), n
