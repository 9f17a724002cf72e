"""Compile the sparse kernels for a Hopper GPU (sm_90) on a machine without one, and report their resources.

Triton's compiler and ptxas run anywhere; only launching needs the GPU. Run as a script (never under
TRITON_INTERPRET=1, which replaces the kernels by the interpreter): prints one JSON line per kernel variant with
registers, spilled bytes (STACK), shared memory, and whether the key loads were pipelined (async copies) and the
dots use wgmma. Integer arguments are marked divisible by 16 where a real launch would specialise them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from salachat.kernels.sparse import triton_attention, triton_select
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SELECT_ARGS = ["Q", "K1", "LSE", "KEYS", "T", "n1", "n_blocks", "q_pos0", "scale", "per_split", "sqh", "sqt",
               "sk1h", "sk1t", "skeyh", "skeyt"]
ATTN_ARGS = ["Q", "K", "V", "O", "PART_LSE", "UNION", "BITS", "COUNT", "BLOCK_POS", "T", "length", "q_pos0", "scale",
             "sqh", "sqt", "skh", "skt", "svh", "svt", "soh", "sot", "s_uh", "s_ut"]
POINTERS = {"Q": "*bf16", "K1": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32",
            "PART_LSE": "*fp32", "KEYS": "*i64", "UNION": "*i32", "BITS": "*i32", "COUNT": "*i32", "BLOCK_POS": "*i32"}
UNSPECIALISED = {"T", "n1", "n_blocks", "q_pos0", "per_split", "length", "skeyt"}  # do_not_specialize, or any value


def build(kernel, args: list[str], constants: dict, num_warps: int, num_stages: int) -> dict:
    signature = {a: POINTERS.get(a, "fp32" if a == "scale" else "i32") for a in args}
    divisible = [i for i, a in enumerate(args) if a != "scale" and a not in UNSPECIALISED]
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    numbers = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", usage)}
    ttgir = compiled.asm["ttgir"]
    return {**numbers, "shared": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"],
            "async_loads": len(re.findall(r"async_copy|async_tma|async_load", ttgir))}


def variants():
    sala = {"BLOCK": 64, "KERNEL": 32, "STRIDE": 16, "INIT": 1, "LOCAL": 32, "PRECISION": "tf32", "D": 128}
    # the launch's own settings: 128-row prefill tiles against 16 blocks (64 for a one-head group) and 16-row
    # decode tiles against 32 blocks, 4 warps, 3 stages
    for group, gpad, bq, blocks, splits in [(16, 16, 8, 16, 1), (3, 4, 32, 16, 1), (7, 8, 16, 16, 1),
                                            (1, 1, 64, 16, 1), (16, 16, 1, 32, 32)]:
        yield (f"flash scorer group {group} rows {gpad * bq}", triton_select._flash_score_kernel, SELECT_ARGS,
               dict(GROUP=group, GPAD=gpad, BQ=bq, NB=blocks, PER_BLOCK=4, LOOKBACK=1, SPLITS=splits, **sala), 4, 3)
    yield ("block-sparse attention group 3", triton_attention._block_sparse_kernel, ATTN_ARGS,
           {"GROUP": 3, "GPAD": 4, "BQ": 16, "D": 128, "BLOCK": 64, "HAS_BLOCK_POS": False, "SPLITS": 1,
            "PRECISION": "tf32", "SLOTS": 0}, 4, 3)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels")
    for name, kernel, args, constants, warps, stages in variants():
        print(json.dumps({"kernel": name, "num_warps": warps, "num_stages": stages,
                          **build(kernel, args, constants, warps, stages)}), flush=True)


if __name__ == "__main__":
    main()
