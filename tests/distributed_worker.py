"""One process of tests/test_distributed.py's gloo group, on the CPU through
the Triton interpreter:

    python tests/distributed_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE CASES_FILE OUT_FILE

For each case in CASES_FILE (written by the test) it runs tritonbn.SyncBatchNorm
on this rank's slice of every step's global batch, forward and backward, and
saves what each step returned and the final buffers to OUT_FILE.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def run_case(case: dict, rank: int) -> dict:
    import tritonbn
    from tritonbn.autotune import LaunchConfig, override

    sizes = case["sizes"]
    start = sum(sizes[:rank])
    module = tritonbn.SyncBatchNorm(case["C"], momentum=case["momentum"], affine=case["affine"],
                                    track_running_stats=case["track"], dtype=case["param_dtype"])
    if case["affine"]:
        with torch.no_grad():
            module.weight.copy_(case["weight"])
            module.bias.copy_(case["bias"])
    configs = {op: LaunchConfig(**config) for op, config in case.get("configs", {}).items()}
    call = torch.compile(module, backend="aot_eager") if case.get("compiled") else module
    steps = []
    with override(**configs):
        for x_global, grad_global in zip(case["x"], case["grad"]):
            x = x_global[start:start + sizes[rank]].clone()
            if case["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            if module.weight is not None:
                module.weight.grad = module.bias.grad = None
            y = call(x)
            y.backward(grad_global[start:start + sizes[rank]])
            steps.append(dict(
                # an empty rank gets no input gradient (None), as with torch's SyncBatchNorm
                y=y.detach(), dx=torch.zeros_like(x) if x.grad is None else x.grad, y_stride=y.stride(),
                dweight=None if module.weight is None else module.weight.grad,
                dbias=None if module.bias is None else module.bias.grad))
    return dict(steps=steps, buffers={name: t.clone() for name, t in module.named_buffers()})


def main() -> None:
    rank, world_size = int(sys.argv[1]), int(sys.argv[2])
    rendezvous, cases_file, out_file = sys.argv[3:6]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        cases = torch.load(cases_file)
        torch.save({name: run_case(case, rank) for name, case in cases.items()}, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
