"""Medians and spreads of repeated measurements, and the Markdown view of a report."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """Median, min, max, quartiles and the interquartile range relative to the median."""
    xs = sorted(values)
    med = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": round(med, digits),
        "min": round(xs[0], digits),
        "max": round(xs[-1], digits),
        "q1": round(q1, digits),
        "q3": round(q3, digits),
        "iqr_pct_of_median": round(100 * (q3 - q1) / med, 1) if med else 0.0,
        "n": len(xs),
    }


def _fmt(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def cell(s: dict[str, Any], digits: int = 0, unit: str = "") -> str:
    """``median [q1-q3] (min-max)`` in one table cell."""
    return (f"{_fmt(s['median'], digits)}{unit} [{_fmt(s['q1'], digits)}-{_fmt(s['q3'], digits)}]"
            f" ({_fmt(s['min'], digits)}-{_fmt(s['max'], digits)})")


def _pairs(s: dict[str, Any]) -> str:
    n = s["pairs_undisturbed"]
    text = f"{n} pair{'' if n == 1 else 's'}"
    if s["pairs_disturbed"]:
        text += f" + {s['pairs_disturbed']} disturbed"
        text += ", all counted: **machine busy**" if s["over"].startswith("all") else " left out"
    return text


def markdown(report: dict[str, Any]) -> str:
    """The report's figures as Markdown tables: every cell is median [IQR] (min-max)."""
    st = report["settings"]
    lines = [
        (f"Benchmark of {report['date']} on {report['machine']['cpus']} CPUs "
        f"({report['machine']['cpu_model']}), Python {report['machine']['python']}: "
        f"{st['rounds']} alternations per point, {st['seconds']} s measured after "
        f"{st['warmup']} s warm-up, pinning `{st['pin']}`, CPU clock `{st['cpu_clock']}`."),
        ("Every cell: median [interquartile range] (min-max) over the rounds; ratios are "
         "computed within each alternation pair."),
        "",
        ("| retrieve, file backend, unlocked, 1,000 secrets | echo ops/s | secretsd ops/s "
         "| ops ratio secretsd/echo | echo CPU µs/req | secretsd CPU µs/req "
         "| CPU/req ratio secretsd/echo | echo p50 µs | secretsd p50 µs | echo p99 µs "
         "| secretsd p99 µs |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report.get("retrieve_vs_echo", []):
        e, s = p["summary"]["echo"], p["summary"]["secretsd"]
        lines.append(
            f"| {p['conns']} conn{'s' if p['conns'] > 1 else ''} ({_pairs(p['summary'])}) "
            f"| {cell(e['ops_per_s'])} "
            f"| {cell(s['ops_per_s'])} | {cell(p['summary']['ratio_ops'], 2)} "
            f"| {cell(e['cpu_us_per_req'], 1)} | {cell(s['cpu_us_per_req'], 1)} "
            f"| {cell(p['summary']['ratio_cpu_per_req'], 2)} | {cell(e['p50_us'])} "
            f"| {cell(s['p50_us'])} | {cell(e['p99_us'])} | {cell(s['p99_us'])} |"
        )
    lines += ["", "| other figures | measured | target |", "|---|---|---|"]
    w = report.get("retrieve_with_writer_32conns")
    if w:
        lines.append(
            f"| p99 at 32 conns while another client stores 50/s (µs), without → with "
            f"| {cell(w['p99_us_without_writer'])} → {cell(w['p99_us_with_writer'])}; "
            f"ratio {cell(w['p99_ratio'], 2)}; {w['writes_per_s']['median']:.0f} writes/s "
            f"| ≤ 2x |")
    a = report.get("audit_log_cost_32conns")
    if a:
        sa = a["summary"]
        lines.append(
            f"| 32 conns retrieve with `--audit-log` ÷ without ({_pairs(sa)}): throughput; CPU per "
            f"answer | {cell(sa['ratio_ops'], 2)}; {cell(sa['ratio_cpu_per_req'], 2)} "
            f"({cell(sa['plain']['ops_per_s'])} → {cell(sa['audited']['ops_per_s'])} ops/s) | ≥ 0.85 |")
    wb = report.get("writer_with_watcher_behind")
    if wb:
        lines.append(
            f"| a writer's store p99 (µs), no watcher → a watcher {wb['behind']:,} events behind "
            f"(home in /dev/shm) | {cell(wb['p99_us_without'])} → {cell(wb['p99_us_with'])}; ratio "
            f"{cell(wb['p99_ratio'], 2)}; watcher kept and told `overflow`: "
            f"{'yes' if wb['watcher_stayed_connected'] and wb['watcher_told_overflow'] else '**no**'} | ≤ 2x |")
    c = report.get("sync_client")
    if c:
        lines.append(f"| blocking `SecretsClient.retrieve`, one connection, calls/s "
                     f"| secretsd {cell(c['secretsd_calls_per_s'])}; echo "
                     f"{cell(c['echo_calls_per_s'])} | ≥ 8,000 |")
    u = report.get("unlock_10000")
    if u:
        lines.append(f"| unlock at 10,000 secrets minus scrypt alone (s) "
                     f"| {cell(u['unlock_minus_scrypt_s'], 3)} (unlock "
                     f"{cell(u['unlock_wall_s'], 3)}, scrypt {cell(u['scrypt_alone_s'], 3)}) "
                     f"| ≤ 0.5 |")
        lines.append(f"| daemon RSS after those unlocks (MB) | {u['rss_mb_after']['VmRSS']} "
                     f"(peak {u['rss_mb_after']['VmHWM']}) | ≤ 80 |")
    g = report.get("secretsctl_get")
    if g:
        lines.append(f"| `secretsctl get` wall ms, entry point / `python -c pass` "
                     f"| {cell(g['secretsctl_ms'], 1)} / {cell(g['python_pass_ms'], 1)}: "
                     f"ratio {cell(g['ratio_entry_point'], 2)} (`python -m`: "
                     f"{cell(g['python_m_ms'], 1)}) | ≤ 2x |")
    k = report.get("keychain")
    if k and "keyring_get_password_per_s" in k:
        lines.append(f"| keychain backend (GNOME Keyring): blocking client through secretsd vs "
                     f"plain `keyring.get_password`, calls/s | {cell(k['secretsd_sync_client_per_s'], 1)}"
                     f" vs {cell(k['keyring_get_password_per_s'], 1)}: "
                     f"{k['ratio_sync_client_vs_keyring']}x (medians); 8 conns "
                     f"{k['secretsd_8conns']['ops_per_s']:,.0f}/s, p99 "
                     f"{k['secretsd_8conns']['p99_us'] / 1000:.1f} ms | — |")
    o = report.get("openbao")
    if o and "hvac_direct_per_s" in o:
        lines.append(f"| OpenBao backend (dev server): blocking client through secretsd vs a direct "
                     f"`hvac` loop, calls/s | {cell(o['secretsd_sync_client_per_s'], 1)} vs "
                     f"{cell(o['hvac_direct_per_s'], 1)}: {o['agent_overhead_us_per_call']} µs added "
                     f"per call (medians); 8 / 32 conns {o['secretsd_8conns']['ops_per_s']:,.0f} / "
                     f"{o['secretsd_32conns']['ops_per_s']:,.0f}/s | — |")
    for name in ("keychain", "openbao"):
        part = report.get(name) or {}
        if "skipped" in part or "error" in part:
            lines.append(f"| {name} backend | {part.get('skipped') or part.get('error')} | — |")
    t = report.get("targets")
    if t:
        lines += ["", "| target | median | limit | met |", "|---|---|---|---|"]
        for row in t:
            lines.append(f"| {row['what']} | {row['median']} | {row['limit']} "
                         f"| {'yes' if row['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"
