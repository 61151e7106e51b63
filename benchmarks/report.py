"""Turn a results dict (run.py's JSON) into table.rst and PNG charts.

    python benchmarks/report.py [results.json]   # re-render next to that file
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import targets  # noqa: E402

PEER_ORDER = ["fastmmap", "perl", "lmdb", "diskcache", "fanout", "redis", "memcached", "manager",
              "dict", "pickle"]
WORKLOADS = ["get_hit", "get_miss", "set", "mix"]


def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return "%.2fM" % (x / 1e6)
    if x >= 1e3:
        return "%.0fk" % (x / 1e3)
    return "%.0f" % x


def fmt_us(ns):
    if ns is None:
        return "-"
    us = ns / 1000.0
    if us < 10:
        return "%.2f" % us
    if us < 100:
        return "%.1f" % us
    return "%.0f" % us


def rows_index(results):
    return {(r["peer"], r["value"], r["workload"], r["procs"]): r for r in results["throughput"]}


def peers_in(results):
    seen = {r["peer"] for r in results["throughput"]}
    return [p for p in PEER_ORDER if p in seen] + sorted(seen - set(PEER_ORDER))


def peer_label(results, key):
    return results["peers"].get(key, {}).get("name", key)


def simple_table(header, rows):
    """A reStructuredText simple table."""
    cols = list(zip(*([header] + rows)))
    widths = [max(len(str(c)) for c in col) for col in cols]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(header), rule] + [line(r) for r in rows] + [rule])


# --------------------------------------------------------------------------- table.rst


def render_rst(results):
    m = results["meta"]
    idx = rows_index(results)
    procs = m["procs"]
    pl = peers_in(results)
    out = []
    title = "fastmmap benchmark results"
    out += [title, "=" * len(title), ""]
    out += [
        ":Machine: %s, %s cores (%s, Linux %s)" % (m["cpu"], m["cores"], m["machine"], m["kernel"]),
        ":Python: %s %s" % (m["implementation"], m["python"]),
        ":Date: %s" % m["date"],
        ":Run: ``benchmarks/run.py%s``: %.2f s per timed loop, %s, up to %d forked "
        "processes, files on %s, %.0f s in all" % (
            " --smoke" if m["mode"] == "smoke" else "", m["duration_s"],
            "best of %d rounds" % m["rounds"] if m.get("rounds", 1) > 1 else "one round",
            max(procs), m["workdir_fs"], m.get("elapsed_s", 0)),
        ":Load: load average %.1f at the start, %.1f at the end%s" % (
            m["loadavg_start"][0], m["loadavg_end"][0],
            " (more than the cores: other work shared the machine, expect noise)"
            if max(m["loadavg_start"][0], m["loadavg_end"][0]) > (m["cores"] or 1) else ""),
        "",
        "Keys are 16 bytes.  Each process runs its loop for the same wall time, started "
        "together by a barrier; one operation in %d is timed with ``time.perf_counter_ns`` "
        "(the timer itself costs about %d ns, included in every latency below).  "
        "Throughput counts every operation.  The 90/10 mix does %d%% sets."
        % (m["chunk"], m["timer_overhead_ns"], round(m["mix_set_fraction"] * 100)),
        "",
    ]
    # ---- peers
    prow = []
    for k in PEER_ORDER + sorted(set(results["peers"]) - set(PEER_ORDER)):
        info = results["peers"].get(k)
        if not info:
            continue
        fails = sum(r.get("set_false_all_rounds", r.get("set_false", 0))
                    for r in results["throughput"] if r["peer"] == k)
        errs = sum(1 for r in results["throughput"] if r["peer"] == k and "error" in r)
        status = ((info.get("version") or "") if info["status"] == "ok"
                  else "MISSING: " + info["reason"])
        fails = "-" if info["status"] != "ok" else str(fails) + (" (%d errors)" % errs if errs else "")
        prow.append([info["name"], status.replace("\n", " ")[:90], fails, info.get("note", "")])
    out += ["Peers", "-----", "",
            simple_table(["peer", "version", "failed sets", "how it is driven"], prow), ""]

    # ---- throughput
    out += ["Throughput", "----------", "",
            "Total operations per second over all processes, for %s processes."
            % " / ".join(map(str, procs)), ""]
    for vk, info in m["value_kinds"].items():
        trows = []
        for p in pl:
            cells = []
            for wl in WORKLOADS:
                vals = []
                for n in procs:
                    r = idx.get((p, vk, wl, n))
                    vals.append("err" if r and "error" in r else fmt_rate(r and r.get("total_ops_s")))
                cells.append(" / ".join(vals))
            if any(c.strip("/ -") for c in cells):
                trows.append([peer_label(results, p)] + cells)
        out += ["%s values, %d keys in the working set:" % (info["label"], info["nkeys"]), "",
                simple_table(["peer"] + [m["workload_names"][w] for w in WORKLOADS], trows), ""]

    # ---- per process
    vk0 = "b100" if "b100" in m["value_kinds"] else next(iter(m["value_kinds"]))
    prow = []
    for p in pl:
        cells = []
        for wl in WORKLOADS:
            vals = []
            for n in procs:
                r = idx.get((p, vk0, wl, n))
                vals.append("err" if r and "error" in r else fmt_rate(r and r.get("per_proc_ops_s_mean")))
            cells.append(" / ".join(vals))
        if any(c.strip("/ -") for c in cells):
            prow.append([peer_label(results, p)] + cells)
    out += ["Per process: the mean of each process's own ops/s, %s values, for %s processes."
            % (m["value_kinds"][vk0]["label"], " / ".join(map(str, procs))), "",
            simple_table(["peer"] + [m["workload_names"][w] for w in WORKLOADS], prow), ""]

    # ---- latency
    ops = [("get_hit", "get", "get hit"), ("get_miss", "get", "get miss"), ("set", "set", "set"),
           ("mix", "get", "mix: get"), ("mix", "set", "mix: set")]
    vk = "b100" if "b100" in m["value_kinds"] else next(iter(m["value_kinds"]))
    out += ["Latency", "-------", ""]
    for n in sorted({procs[0], procs[-1]}):
        lrows = []
        for p in pl:
            cells = []
            for wl, op, _ in ops:
                r = idx.get((p, vk, wl, n))
                lat = r and r.get("latency_ns", {}).get(op)
                cells.append("%s / %s / %s" % (fmt_us(lat["p50"]), fmt_us(lat["p99"]), fmt_us(lat["max"]))
                             if lat else "-")
            if any(c != "-" for c in cells):
                lrows.append([peer_label(results, p)] + cells)
        out += ["p50 / p99 / max in microseconds, %s values, %d process%s." %
                (m["value_kinds"][vk]["label"], n, "" if n == 1 else "es"), "",
                simple_table(["peer"] + [o[2] for o in ops], lrows), ""]

    # ---- eviction
    ev = results.get("eviction")
    if ev:
        out += ["Eviction quality", "----------------", "",
                "Read-through (get; set on a miss) over %d requests with Zipf(%.2f) key popularity "
                "over %d keys of %d + %d bytes; the first %d requests warm up.  The cache "
                "(%d pages of %d KiB = %d bytes) holds about %.0f%% of the working set's "
                "key and value bytes; the exact LRU has the same capacity in key + value bytes."
                % (ev["requests"], ev["zipf_s"], ev["nkeys"], ev["key_bytes"], ev["value_bytes"],
                   ev["warmup"], ev["num_pages"], ev["page_size"] // 1024, ev["capacity_bytes"],
                   100.0 * ev["capacity_bytes"] / ev["working_set_bytes"]), ""]
        erows = [[label, "%.2f%%" % (100 * ev[k])] for k, label in
                 (("fastmmap_hit_rate", "fastmmap"), ("perl_hit_rate", "Cache::FastMmap (Perl)"),
                  ("lru_hit_rate", "exact LRU (OrderedDict), key + value bytes"),
                  ("lru_with_overhead_hit_rate", "exact LRU charged %.1f B/entry more (fastmmap's "
                   "overhead)" % ev.get("lru_overhead_bytes", 0))) if k in ev]
        out += [simple_table(["cache", "hit rate"], erows), ""]

    # ---- memory
    mem = results.get("memory")
    if mem:
        out += ["Memory", "------", "",
                "Cache bytes per stored entry beyond its key and value: one 64 KiB page filled "
                "with distinct 16-byte keys until the first eviction, cache_size / entries - key "
                "- value (entry header, alignment, slot table and page header).  The last "
                "column is the steady state of the default geometry (89 pages of 64 KiB) after "
                "three times as many distinct keys as fit: it adds the room eviction leaves free.",
                ""]
        mrows = []
        def cell(row, prefix):
            if prefix + "_overhead" not in row:
                return "-"
            return "%.1f (%d entries)" % (row[prefix + "_overhead"], row[prefix + "_entries"])

        for row in mem:
            mrows.append(["%d B" % row["value_bytes"], cell(row, "fastmmap"), cell(row, "perl"),
                          cell(row, "fastmmap_full")])
        out += [simple_table(["value", "fastmmap, one page", "Cache::FastMmap (Perl), one page",
                              "fastmmap, full default cache"], mrows), ""]

    # ---- targets
    trows = [[t["name"], t["measured_text"], t["target_text"], t["verdict"]]
             for t in targets.evaluate(results)]
    out += ["Targets", "-------", "",
            "The issue's target ratios, measured in this run (``benchmarks/targets.py``).  "
            "Nothing fails on a MISS.  Beside each 2/1 process ratio is the plain dict's, which "
            "shares nothing: it shows how much of a second core the machine gave.", "",
            simple_table(["target", "measured", "target", "result"], trows), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- charts


def _colors(pl):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {p: cmap(i % 10) for i, p in enumerate(PEER_ORDER + [p for p in pl if p not in PEER_ORDER])}


def chart_throughput(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["meta"]
    idx = rows_index(results)
    pl = [p for p in peers_in(results) if p != "pickle"]
    colors = _colors(pl)
    kinds = list(m["value_kinds"])
    fig, axes = plt.subplots(len(kinds), len(WORKLOADS), figsize=(4.2 * len(WORKLOADS), 3.3 * len(kinds)),
                             squeeze=False, sharex=True)
    for i, vk in enumerate(kinds):
        for j, wl in enumerate(WORKLOADS):
            ax = axes[i][j]
            for p in pl:
                xs, ys = [], []
                for n in m["procs"]:
                    r = idx.get((p, vk, wl, n))
                    if r and r.get("total_ops_s"):
                        xs.append(n)
                        ys.append(r["total_ops_s"])
                if xs:
                    ax.plot(xs, ys, marker="o", color=colors[p], label=peer_label(results, p),
                            linewidth=2.5 if p == "fastmmap" else 1.2,
                            linestyle="--" if p == "dict" else "-")
            ax.set_yscale("log")
            ax.set_xticks(m["procs"])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title("%s, %s" % (m["workload_names"][wl], m["value_kinds"][vk]["label"]), fontsize=10)
            if j == 0:
                ax.set_ylabel("total ops/s")
            if i == len(kinds) - 1:
                ax.set_xlabel("processes")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9)
    fig.suptitle("Total ops/s by process count (%s, %s cores, Python %s, %s)"
                 % (m["cpu"], m["cores"], m["python"], m["date"][:10]), fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_latency(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["meta"]
    idx = rows_index(results)
    pl = [p for p in peers_in(results) if p != "pickle"]
    colors = _colors(pl)
    vk = "b100" if "b100" in m["value_kinds"] else next(iter(m["value_kinds"]))
    ops = [("get_hit", "get", "get hit"), ("get_miss", "get", "get miss"), ("set", "set", "set"),
           ("mix", "get", "mix: get"), ("mix", "set", "mix: set")]
    nps = sorted({m["procs"][0], m["procs"][-1]})
    fig, axes = plt.subplots(len(nps), len(ops), figsize=(3.6 * len(ops), 3.8 * len(nps)), squeeze=False)
    stats = [("p50", 1.0), ("p99", 0.6), ("max", 0.25)]
    for i, n in enumerate(nps):
        for j, (wl, op, title) in enumerate(ops):
            ax = axes[i][j]
            names = []
            for x, p in enumerate(pl):
                r = idx.get((p, vk, wl, n))
                lat = r and r.get("latency_ns", {}).get(op)
                names.append(p)
                if not lat:
                    continue
                for s, (stat, alpha) in enumerate(stats):
                    ax.bar(x + (s - 1) * 0.27, lat[stat] / 1000.0, width=0.27, color=colors[p],
                           alpha=alpha, label=stat if x == 0 else None)
            ax.set_yscale("log")
            ax.set_axisbelow(True)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.set_title("%s, %d proc%s" % (title, n, "" if n == 1 else "s"), fontsize=10)
            if j == 0:
                ax.set_ylabel("microseconds")
    fig.suptitle("Latency per operation, %s values: p50, p99, max (bars dark to light; "
                 "1 op in %d sampled)" % (m["value_kinds"][vk]["label"], m["chunk"]), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(results, out_dir):
    with open(os.path.join(out_dir, "table.rst"), "w") as f:
        f.write(render_rst(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib missing: no charts (pip install -r benchmarks/requirements.txt)")
        return
    chart_throughput(results, os.path.join(out_dir, "throughput.png"))
    chart_latency(results, os.path.join(out_dir, "latency.png"))


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "latest.json")
    with open(src) as f:
        write_all(json.load(f), os.path.dirname(os.path.abspath(src)))
