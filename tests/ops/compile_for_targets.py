"""Compile every Triton kernel of pkmem for NVIDIA GPUs from sm_80 without a GPU: Triton's own
compiler pipeline down to a cubin (ptxas ships with triton), with the block sizes each GPU would
choose from its properties (:data:`pkmem.ops.triton._common.TARGETS`: SMs, L2, ...), at the paper's
setting and at decode sizes. By default one GPU per architecture CI checks (A100: sm_80, L40S:
sm_89, H100: sm_90); ``--devices all`` for every GPU of the table. Run without TRITON_INTERPRET::

    python tests/ops/compile_for_targets.py [--devices A100 "RTX 4090" ...] [--json out.json] [--fused]

Prints one line per GPU and kernel: the block sizes, registers per thread, local memory (spills),
shared memory and the programs resident per SM; exits 1 if a kernel does not compile, needs more
shared memory than the GPU gives a program, or spills registers."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton  # noqa: E402

from pkmem.ops.triton import _common, gather, norm, row_adam, search  # noqa: E402

DEVICES = ("A100", "L40S", "H100")  # sm_80, sm_89, sm_90
I32, F32 = "i32", "fp32"


def _jobs(dev: _common.DeviceInfo, fused: bool = False) -> list[dict]:
    """The kernels ``dev`` launches at the paper's setting (dim 1024, 4 heads, k 32, k_dim 512,
    512**2 slots, 8192 tokens, bf16 table and queries under autocast) and at decode sizes (and the
    search's fused variant, a benchmark option, with ``fused``)."""
    jobs = []

    def add(what, module, name, types, consts, warps):
        job = dict(what=what, module=module.__name__, kernel=name, types=types, consts=consts, warps=warps)
        jobs.append(job)

    s_types = dict(Q="*bf16", K="*fp32", S="*fp32", CV="*fp32", CC="*i32", CAND="*i32", S_OUT="*fp32")
    s_types.update(I_OUT="*i64", T=I32, H=I32, n=I32, D=I32, topk=I32, C=I32, inv_temp=F32, stride_qt=I32)
    s_types.update(stride_qh=I32, s_half=I32, s_stride=I32, s_block=I32)
    # k = 32, and the heads x k variants' k = 8 and 16 (fewer warps: see search._fwd_config)
    sizes = [(8192, "softmax", 32), (64, "relu", 32), (8192, "softmax", 8), (64, "softmax", 16)]
    for T, score, topk in sizes:
        c = dict(search._fwd_config(T, 4, 512, 256, topk, "ieee", dev))
        consts = {k: c[k] for k in ("BT", "BN", "BD", "NG", "CAP", "PRECISION", "TOPK", "FUSED", "EXACT")}
        cp = search._candidate_table(topk, torch.device("cpu"))[0].shape[1]
        consts.update(KP=topk, CP=cp, BNS=min(c["BN"], 2 * topk), SCORE=search.SCORE_CODES[score])
        what = f"search forward, {T} tokens, k {topk}"
        add(what, search, "_search_fwd_kernel", s_types, consts, c["num_warps"])
    cp = search._candidate_table(32, torch.device("cpu"))[0].shape[1]
    if fused:  # half scores by tl.dot in the kernel (float32 queries, tf32 products)
        c = dict(search._fwd_config(8192, 4, 512, 256, 32, "tf32", dev))
        consts = {k: c[k] for k in ("BN", "BD", "NG", "CAP", "PRECISION", "TOPK", "EXACT")}
        consts.update(BT=16, FUSED=True, KP=32, CP=cp, BNS=min(c["BN"], 64), SCORE=1)
        add("search forward, fused tl.dot", search, "_search_fwd_kernel", dict(s_types, Q="*fp32"), consts, 4)
    b = search._bwd_config(8192, 4, 512, dev)
    b_types = dict(GS="*fp32", W="*fp32", IDX="*i64", G="*bf16", T=I32, H=I32, n=I32, topk=I32, inv_temp=F32)
    b_types.update(Q="*fp32", Q16="*bf16", stride_qt=I32, stride_qh=I32, kd=I32)
    consts = dict(BT=b["BT"], KP=32, BNZ=128, SCORE=1, KDP=512, CAST_Q=True)
    add("search backward scatter", search, "_search_bwd_scatter_kernel", b_types, consts, b["num_warps"])

    f_types = dict(V="*bf16", IDX="*i64", W="*fp32", OUT="*fp32", J=I32, v_dim=I32, stride_v=I32)
    for T in (8192, 64):
        g = gather._fwd_config(T, 128, 1024, 512**2, 2, dev.l2_bytes)
        consts = dict(BLOCK_V=g["BLOCK_V"], BLOCK_J=g["BLOCK_J"])
        add(f"gather forward, {T} tokens", gather, "_gather_fwd_kernel", f_types, consts, g["num_warps"])
    g = gather._bwd_config(512**2, 1024)
    w_types = dict(V="*bf16", G="*bf16", W="*fp32", PERM="*i64", OFFS="*i64", ROWS="*i64", GV="*bf16")
    w_types.update(GW="*fp32", n_rows=I32, v_dim=I32, stride_v=I32, stride_g=I32, TJ=I32)
    w_types.update(SORTED="*i32", TOUCHED="*i8", SUMSQ="*fp32")  # row mode's (pkmem.ops.rows.RowGrad)
    consts = dict(J=128, BLOCK_V=g["BLOCK_V"], E=g["E"], SPARSE=False, NEED_GV=True, NEED_GW=True)
    consts.update(PREFETCH=g["PREFETCH"], POS="int32", VPP=g["VPP"], GW_ADD=True)
    consts.update(ROWMODE=False, BY_ENTRY=False)
    add("gather backward", gather, "_gather_bwd_kernel", w_types, consts, g["num_warps"])

    # the row-sparse value optimizer (pkmem.optim.RowAdam): the gather backward's row mode (rows read
    # into a RowGrad, per row or per sorted entry) and the row Adam update, bf16 and fp32 tables
    for dt, v, by_entry in [("bf16", 1024, False), ("fp32", 512, True)]:
        g = gather._bwd_config(512**2, v)
        nvb = triton.cdiv(v, g["BLOCK_V"])
        types = dict(w_types, V=f"*{dt}", G=f"*{dt}", GV=f"*{dt}")
        consts = dict(J=128, BLOCK_V=g["BLOCK_V"], E=g["E"], SPARSE=False, NEED_GV=True, NEED_GW=True)
        consts.update(PREFETCH=g["PREFETCH"], POS="int32", VPP=nvb, GW_ADD=nvb <= 2)
        consts.update(ROWMODE=True, BY_ENTRY=by_entry)
        add(f"gather backward, row mode, {dt}", gather, "_gather_bwd_kernel", types, consts, g["num_warps"])
    for dt, v in [("bf16", 1024), ("fp32", 512)]:
        c = row_adam._config(v)
        types = dict(P=f"*{dt}", M1="*fp32", M2="*fp32", GD=f"*{dt}", TOUCHED="*i8", ROWS="*i32")
        types.update(COUNT="*i32", SCALE="*fp32", LAST="*i32", HIST="*fp32", FLAGS="*i8")
        types.update(STEP="*fp32", COEF="*fp32", FOUND_INF="*fp32")
        types.update(n_rows=I32, v_dim=I32, stride_p=I32, stride_g=I32)
        types.update(one_minus_beta1=F32, beta2=F32, one_minus_beta2=F32, eps=F32, seed="i64")
        for source, has_grad, exact in [
            (0, True, False),
            (0, True, True),
            (1, False, True),
            (2, False, True),
        ]:
            consts = dict(BLOCK_V=c["BLOCK_V"], NVB=triton.cdiv(v, c["BLOCK_V"]), SOURCE=source)
            consts.update(
                HAS_GRAD=has_grad, HAS_SCALE=has_grad, EXACT=exact, SR=dt == "bf16", HAS_FLAG=has_grad
            )
            what = f"row adam, {dt}, rows from {source}, gradient {has_grad}, exact {exact}"
            add(what, row_adam, "_row_adam_kernel", types, consts, c["num_warps"])

    # the query network's BatchNorm: bf16 x (2048 features), masked, training; 8192 tokens (several
    # chunks: two launches each way) and 64 (one chunk: one launch each way)
    n_types = dict(X="*bf16", MASK="*u8", SHIFT="*fp32", PCNT="*fp32", PMEAN="*fp32", PM2="*fp32")
    n_types.update(T=I32, C=I32, stride_x=I32)
    y_types = dict(X="*bf16", SHIFT="*fp32", PCNT="*fp32", PMEAN="*fp32", PM2="*fp32", RMEAN="*fp32")
    y_types.update(RVAR="*fp32", W="*fp32", B="*fp32", Y="*bf16", MEAN="*fp32", VAR="*fp32", T=I32, C=I32)
    y_types.update(n_chunks=I32, stride_x=I32, eps=F32, momentum=F32, MASK="*u8")
    s_types = dict(DY="*bf16", X="*bf16", SHIFT="*fp32", MASK="*u8", MEAN="*fp32", VAR="*fp32", PCNT="*fp32")
    s_types.update(P1="*fp32", P2="*fp32", T=I32, C=I32, stride_dy=I32, stride_x=I32, eps=F32)
    d_types = dict(DY="*bf16", X="*bf16", SHIFT="*fp32", MASK="*u8", MEAN="*fp32", VAR="*fp32", W="*fp32")
    d_types.update(PCNT="*fp32", P1="*fp32", P2="*fp32", DX="*bf16", DW="*fp32", DB="*fp32", DSHIFT="*fp32")
    d_types.update(T=I32, C=I32, n_chunks=I32, stride_dy=I32, stride_x=I32, eps=F32)
    for T in (8192, 64):
        c = norm._config(T, 2048, dev)
        one = -(-T // c["ROWS"]) == 1 and c["ONE_CHUNK"]
        rows = dict(ROWS=c["ROWS"], BR=c["BR"], BC=c["BC"])
        w = c["num_warps"]
        if not one:
            add(f"batch norm statistics, {T} tokens", norm, "_bn_stats_kernel", n_types,
                dict(rows, HAS_MASK=True, HAS_SHIFT=True), w)  # fmt: skip
            add(f"batch norm backward sums, {T} tokens", norm, "_bn_bwd_sums_kernel", s_types,
                dict(rows, HAS_MASK=True, HAS_SHIFT=True), w)  # fmt: skip
        consts = dict(rows, NCB=32, TRAINING=True, HAS_W=True, HAS_B=True, UPDATE=True, HAS_SHIFT=True)
        add(f"batch norm normalise, {T} tokens", norm, "_bn_norm_kernel", y_types,
            dict(consts, ONE_CHUNK=one, HAS_MASK=True), w)  # fmt: skip
        consts = dict(rows, NCB=32, TRAINING=True, HAS_MASK=True, HAS_W=True, SUMS=True, NEED_DX=True)
        add(f"batch norm backward dx, {T} tokens", norm, "_bn_bwd_dx_kernel", d_types,
            dict(consts, HAS_SHIFT=True, NEED_SHIFT=True, ONE_CHUNK=one), w)  # fmt: skip
    return jobs


def _resources(cubin: bytes) -> dict:
    """Registers per thread, stack and local memory (bytes per thread) of a cubin (cuobjdump)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):  # pragma: no cover - triton ships it
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {} if m is None else dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def _compile(job: dict, arch: int) -> dict:
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    consts = {k: (getattr(triton.language, v) if v == "int32" else v) for k, v in job["consts"].items()}
    sig = dict(job["types"], **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": job["warps"]})
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    return {"cubin_bytes": len(k.asm["cubin"]), "shared": k.metadata.shared, **_resources(k.asm["cubin"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", nargs="+", default=list(DEVICES), help=f"of {list(_common.TARGETS)}, or all")
    ap.add_argument("--fused", action="store_true", help="also the search's fused variant (slow to compile)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    names = list(_common.TARGETS) if args.devices == ["all"] else args.devices
    devices = [_common.TARGETS[name] for name in names]
    rows, unique = [], {}
    for dev in devices:
        for job in _jobs(dev, args.fused):
            key = [dev.arch, job["module"], job["kernel"], job["consts"], job["warps"]]
            key = json.dumps(key, sort_keys=True)
            unique.setdefault(key, (job, dev.arch))
            rows.append((dev, job, key))
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {key: pool.submit(_compile, job, arch) for key, (job, arch) in unique.items()}
        built = {key: f.result() for key, f in futures.items()}
    out, bad = [], 0
    for dev, job, key in rows:
        r = dict(built[key])
        threads = 32 * job["warps"]
        problems = []
        if "error" in r:
            problems.append(r["error"])
        else:
            if r["shared"] > dev.smem_per_block:
                problems.append(f"{r['shared']} B of shared memory > {dev.smem_per_block}")
            if r.get("local", 0) > 0:
                problems.append(f"{r['local']} B of local memory per thread (spilled registers)")
            if "regs" in r:
                per_sm = [dev.threads_per_sm // threads, dev.regs_per_sm // (max(r["regs"], 1) * threads)]
                if r["shared"]:
                    per_sm.append(dev.smem_per_block // r["shared"])
                r["programs_per_sm"] = min(per_sm)
                if r["programs_per_sm"] < 1:
                    problems.append("no program fits on a multiprocessor")
        bad += bool(problems)
        config = dict(job["consts"], num_warps=job["warps"])
        out.append(dict(device=dev.name, arch=dev.arch, what=job["what"], kernel=job["kernel"]))
        out[-1].update(config=config, problems=problems, **r)
        cfg = " ".join(f"{k}={v}" for k, v in out[-1]["config"].items())
        res = "; ".join(problems) or (
            f"{r.get('regs', '?')} registers, {r.get('local', '?')} B local, {r['shared']} B shared, "
            f"{r.get('programs_per_sm', '?')} programs/SM, {r['cubin_bytes']} B cubin"
        )
        print(f"{dev.name} (sm_{dev.arch}) | {job['what']} | {cfg} | {res}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
