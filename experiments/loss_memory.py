"""Per-device memory of the sigmoid loss: plain dense under jit vs all-gather vs ring-chunked.

    python experiments/loss_memory.py [--batch 8192] [--width 256] [--devices 8,16]

The baseline is what a user would otherwise run: the plain dense
``vlm_jax.losses.sigmoid_loss`` on embeddings sharded ``P("data", None)``,
under a plain ``jax.jit`` that GSPMD partitions. Against it, the two
shard_map losses, ``gathered_sigmoid_loss`` and ``chunked_sigmoid_loss``, on
the same inputs. For each, ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))``
(gradients wrt zimg, ztxt, t and b: forward and backward, as in a train step)
is compiled for a 1-D ("data",) mesh of simulated CPU devices, and the table
gives XLA's temporary buffer size per device
(``compiled.memory_analysis().temp_size_in_bytes``; the compiled SPMD program
is the per-device one). Each device count runs in its own subprocess, because
XLA_FLAGS must be set before jax is imported.

With b = B / n the local batch: dense and all-gather hold b x B blocks (dense
two, all-gather one), chunked one b x b block and three [b, D] arrays, so the
ratios grow roughly linearly with n.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

IMPLS = ("dense", "gather", "chunked")


def measure(n_devices: int, batch: int, width: int) -> dict:
    """Runs in a fresh process with n_devices simulated CPU devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from vlm_jax import losses

    assert jax.device_count() == n_devices, (jax.device_count(), n_devices)
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(AxisType.Auto,))
    emb = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    fns = {
        "dense": losses.sigmoid_loss,
        "gather": lambda x, y, t, b: losses.gathered_sigmoid_loss(x, y, t, b, mesh=mesh),
        "chunked": lambda x, y, t, b: losses.chunked_sigmoid_loss(x, y, t, b, mesh=mesh),
    }
    out = {"devices": n_devices, "local_batch": batch // n_devices}
    for name in IMPLS:
        step = jax.jit(jax.value_and_grad(fns[name], argnums=(0, 1, 2, 3)))
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
    print(f"value_and_grad (wrt zimg, ztxt, t, b) of the sigmoid loss, global batch {args.batch}, "
          f"width {args.width}, float32")
    print("temp memory per device (compiled.memory_analysis().temp_size_in_bytes)")
    print("plain dense = losses.sigmoid_loss under jax.jit on P('data', None) inputs (GSPMD)\n")
    print(f"{'devices':>7} {'local b':>7} {'plain dense MiB':>15} {'gathered MiB':>12} {'chunked MiB':>11} "
          f"{'dense/chunked':>13} {'gathered/chunked':>16}")
    for r in rows:
        chunked = max(r["chunked"], 1)
        print(
            f"{r['devices']:>7} {r['local_batch']:>7} {r['dense'] / mib:>15.2f} {r['gather'] / mib:>12.2f} "
            f"{r['chunked'] / mib:>11.2f} {r['dense'] / chunked:>12.1f}x {r['gather'] / chunked:>15.1f}x"
        )


if __name__ == "__main__":
    main()
