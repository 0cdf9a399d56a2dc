#!/usr/bin/env python3
"""PyTorch reference for store-agent's train_throughput bench.

Trains the MLP 47-64-32-1 (ReLU, MSE, Adam 1e-3) on one thread over the batches the bench
wrote, from the initial weights the bench wrote, and prints one JSON line:
{"samples_per_s": ..., "final_loss": ..., "steps": ...}.

Input files (raw little-endian float32, written by benches/train_throughput.rs):
  --data     rows x (47 features + 1 target), row-major
  --weights  hidden.0.weight, hidden.0.bias, hidden.1.weight, hidden.1.bias, head.weight,
             head.bias, each row-major, concatenated
"""

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    raw = np.fromfile(args.data, dtype="<f4").reshape(args.rows, 48)
    x = torch.from_numpy(raw[:, :47].copy())
    y = torch.from_numpy(raw[:, 47:].copy())

    model = torch.nn.Sequential(
        torch.nn.Linear(47, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
    )
    flat = torch.from_numpy(np.fromfile(args.weights, dtype="<f4"))
    offset = 0
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            for p in (layer.weight, layer.bias):
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    assert offset == flat.numel(), "weights file does not match the model"

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    batches = args.rows // args.batch

    def step(i: int) -> torch.Tensor:
        start = (i % batches) * args.batch
        xb, yb = x[start:start + args.batch], y[start:start + args.batch]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup_steps):
        step(i)
    begin = time.perf_counter()
    for i in range(args.warmup_steps, args.warmup_steps + args.steps):
        loss = step(i)
    elapsed = time.perf_counter() - begin

    print(json.dumps({
        "samples_per_s": args.steps * args.batch / elapsed,
        "final_loss": float(loss),
        "steps": args.steps,
    }))


if __name__ == "__main__":
    main()
