"""The benchmark's ``--quick`` mode end to end (tiny lengths, in process; no timing checks)."""

from __future__ import annotations

import json

import bench  # benchmarks/bench.py, on pytest's pythonpath


def test_quick_bench_writes_a_table_and_scorer_matches_plain_greedy(tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# Benchmarks\n\nprose before\n\n"
        "<!-- bench:cpu-tiny:begin -->\nold table\n<!-- bench:cpu-tiny:end -->\n\nprose after\n"
    )
    raw = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out), "--json", str(raw)]) == 0

    data = json.loads(raw.read_text())
    by = {(r["method"], r["length"]): r for r in data["results"]}
    assert data["lengths"] == list(bench.QUICK_LENGTHS)
    for length in bench.QUICK_LENGTHS:
        a, b, c = (by[(m, length)] for m in bench.METHODS)
        assert a["status"] == b["status"] == c["status"] == "ok"
        # Same prompt, same forced token count, and the scorer decodes exactly what plain
        # greedy generation (HF SDPA + KV cache) decodes; so does the naive full-sequence way.
        assert len(a["tokens"]) == data["new_tokens"] == 3
        assert b["tokens"] == a["tokens"]
        assert c["tokens"] == a["tokens"]
        for r in (a, b, c):
            assert r["total_s"] > 0
            # Peak memory: an int over a real baseline (the process's resident set), measured by
            # one of the meter's named ways.
            assert isinstance(r["peak_bytes"], int) and r["baseline_bytes"] > 0
            assert r["memory_meter"] in (
                "VmHWM (reset via clear_refs)",
                "ru_maxrss (not resettable)",
            )

    text = out.read_text()
    assert "prose before" in text and "prose after" in text and "old table" not in text
    begin, end = "<!-- bench:cpu-tiny:begin -->", "<!-- bench:cpu-tiny:end -->"
    section = text.split(begin)[1].split(end)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for length in bench.QUICK_LENGTHS:
        for method in bench.METHODS:
            label = bench.METHOD_LABELS[method]
            row = [row for row in rows if row.startswith(f"| {length} | {label} |")]
            assert len(row) == 1, (length, method, rows)
            # The row reports the measured time and peak memory (MiB) of that run.
            r = by[(method, length)]
            assert f"| {r['total_s']:.2f} |" in row[0], (row, r["total_s"])
            assert f"| {r['peak_bytes'] / 2**20:.0f} |" in row[0], (row, r["peak_bytes"])
    assert "torch" in section and "transformer_lens" in section
    assert capsys.readouterr().out.count("(b) scorer") == len(bench.QUICK_LENGTHS)


def test_write_section_appends_missing_markers_and_keeps_other_sections(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n<!-- bench:cuda-1b:begin -->\npending\n<!-- bench:cuda-1b:end -->\n")
    bench.write_section(doc, "cpu-small", "cpu table")
    bench.write_section(doc, "cpu-small", "cpu table v2")
    text = doc.read_text()
    assert "pending" in text and "cpu table v2" in text and "cpu table\n" not in text
    assert text.count("<!-- bench:cpu-small:begin -->") == 1


def test_batch_sweep_table_and_verdict_follow_the_numbers():
    import bench_batch

    machine = {
        "cpu": "c",
        "logical_cores": 2,
        "torch_threads": 1,
        "os": "o",
        "python": "3",
        "date": "d",
        "load_average": [0.5, 0.5, 0.5],
        "versions": {"torch": "t", "transformers": "h", "transformer-lens": "l"},
    }

    def row(batch, decode, same=True):
        return {
            "batch": batch,
            "tn_s": 10.0 / batch,
            "decode_s": 1.0,
            "trials_per_s": 1.6 * batch,
            "tokens_per_s": 25.6 * batch,
            "decode_tokens_per_s": decode,
            "peak_extra_bytes": batch * 2**20,
            "memory_meter": "m",
            "same_records": same,
        }

    data = {
        "machine": machine,
        "model": "m",
        "device": "cpu",
        "length": 1024,
        "prompt_tokens": 1000,
        "n_trials": 16,
        "new_tokens": 16,
        "repeats": 1,
        "wall_s": 60.0,
        "command": "python benchmarks/bench.py --batch-only",
        "results": [row(1, 10.0), row(4, 30.0), row(8, 45.0, same=False), row(16, 50.0)],
        "roofline": {
            "tokens": 1000,
            "prefill_s": 2.0,
            "gflop": 180.0,
            "linear_gflop": 170.0,
            "attention_gflop": 10.0,
            "prefill_gflops": 90.0,
            "peak_gflops": 100.0,
            "peak_shape": "[1000, 4] @ [4, 8]",
            "share": 0.9,
            "linear_1_ms": 20.0,
            "linear_8_ms": 40.0,
            "linear_cap_8": 4.0,
        },
    }
    text = bench_batch.render_batch_sweep(data)
    assert "90 GFLOP/s, 90% of the 100 GFLOP/s" in text
    assert "the 16 trials spent 9 s of their 10 s in prefill" in text
    assert "20.0 ms and on 8 rows 40.0 ms" in text and "at 4.0×" in text
    assert "| 8 | 12.800 | 204.8 | 45.0 | 4.50 | 8 | **no** |" in text
    assert "**met** (4.50×)" in text
    data["results"][2] = row(8, 20.0)
    assert "**missed** (2.00×)" in bench_batch.render_batch_sweep(data)
