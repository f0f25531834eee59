"""Per-device memory of the ring-chunked vs the all-gather sigmoid loss.

    python experiments/loss_memory.py [--batch 8192] [--width 256] [--devices 8,16]

Compiles ``jax.value_and_grad`` (wrt zimg, ztxt, t, b) of
``vlm_jax.losses.chunked_sigmoid_loss`` and ``gathered_sigmoid_loss`` for the
same global batch sharded over a 1-D ("data",) mesh of simulated CPU devices,
and prints XLA's temporary buffer size per device
(``compiled.memory_analysis().temp_size_in_bytes``; with shard_map the compiled
SPMD program is the per-device one) side by side. Each device count runs in its
own subprocess, because XLA_FLAGS must be set before jax is imported.

The all-gather loss holds a b x B block per device (b = B / n), the chunked one
b x b blocks, so the ratio should grow roughly linearly with n.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(n_devices: int, batch: int, width: int) -> dict:
    """Runs in a fresh process with n_devices simulated CPU devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlm_jax import losses

    assert jax.device_count() == n_devices, (jax.device_count(), n_devices)
    mesh = jax.make_mesh((n_devices,), ("data",))
    emb = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    out = {"devices": n_devices, "local_batch": batch // n_devices}
    for name, fn in (("chunked", losses.chunked_sigmoid_loss), ("gather", losses.gathered_sigmoid_loss)):
        loss = lambda x, y, t, b, fn=fn: fn(x, y, t, b, mesh=mesh, batch_axes=("data",))  # noqa: E731
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        compiled = step.lower(emb, emb, scalar, scalar).compile()
        out[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192, help="global batch size B")
    parser.add_argument("--width", type=int, default=256, help="embedding width D")
    parser.add_argument("--devices", default="8,16", help="comma-separated device counts")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.width)))
        return

    rows = []
    for n in (int(v) for v in args.devices.split(",")):
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, __file__, "--child", str(n), "--batch", str(args.batch), "--width", str(args.width)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            sys.exit(f"measurement on {n} devices failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))

    mib = 2.0**20
    print(f"value_and_grad of the sigmoid loss, global batch {args.batch}, width {args.width}, float32")
    print("temp memory per device (compiled.memory_analysis().temp_size_in_bytes)\n")
    print(f"{'devices':>7} {'local b':>7} {'all-gather MiB':>15} {'chunked MiB':>12} {'gather/chunked':>15}")
    for r in rows:
        ratio = r["gather"] / max(r["chunked"], 1)
        print(
            f"{r['devices']:>7} {r['local_batch']:>7} {r['gather'] / mib:>15.2f} "
            f"{r['chunked'] / mib:>12.2f} {ratio:>14.1f}x"
        )


if __name__ == "__main__":
    main()
