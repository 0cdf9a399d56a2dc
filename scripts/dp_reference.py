#!/usr/bin/env python3
"""Reference values for Fedmesh's RDP accountant, from Google's dp-accounting 0.6.

Writes protocol/tests/data/rdp_reference.json, which protocol/tests/accountant_reference.rs
checks to 1e-6 relative. Run it in a scratch venv, not the project venv:

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpvenv/bin/python scripts/dp_reference.py

Every case uses the Poisson-subsampled Gaussian mechanism under add-or-remove-one
adjacency and the accountant's default orders. Infinite values are written as "inf",
since JSON has no infinity.
"""

import itertools
import json
import math
import pathlib

from absl import logging
import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

OUT = pathlib.Path(__file__).resolve().parent.parent / "protocol/tests/data/rdp_reference.json"


def num(x):
    """A float for JSON, with infinities spelt out."""
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def event(q, sigma, steps):
    """`steps` rounds of the Poisson-subsampled Gaussian mechanism."""
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )


def epsilon(mechanisms, delta):
    accountant = rdp.RdpAccountant()
    for q, sigma, steps in mechanisms:
        accountant.compose(event(q, sigma, steps))
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return accountant, eps, order


def single_cases():
    named = [
        (1.0, 0.01, 1000, 1e-5),
        (2.0, 0.1, 200, 1e-5),
        (1.1, 256 / 60000, 14063, 1e-5),
        (1.0, 64 / 1070, 192, 1e-5),
    ]
    sigmas = [0.3, 0.5, 0.8, 1.0, 1.3, 2.0, 4.0, 10.0]
    qs = [0.0005, 256 / 60000, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]
    steps = [1, 30, 1000]
    grid = [(s, q, t, 1e-5) for s, q, t in itertools.product(sigmas, qs, steps)]
    deltas = [(1.0, 0.01, 500, d) for d in (1e-3, 1e-6, 1e-9, 0.5, 1.0)]
    edges = [
        (0.0, 0.01, 10, 1e-5),  # no noise: infinite epsilon
        (1.0, 0.0, 10, 1e-5),  # never sampled: zero
        (0.0, 0.0, 10, 1e-5),
        (1.0, 0.01, 100, 0.0),  # delta 0: infinite unless nothing was spent
        (1.0, 0.0, 100, 0.0),
        (50.0, 0.001, 1, 1e-5),  # so little spent that the KL bound gives 0
        (0.1, 1.0, 1, 1e-5),
    ]
    for sigma, q, t, delta in named + grid + deltas + edges:
        _, eps, order = epsilon([(q, sigma, t)], delta)
        yield {
            "sigma": sigma,
            "q": q,
            "steps": t,
            "delta": delta,
            "epsilon": num(eps),
            "order": num(order),
        }


def composed_cases():
    sets = [
        [(0.01, 1.0, 100), (0.05, 2.0, 50)],
        [(256 / 60000, 1.1, 5000), (1.0, 8.0, 3), (0.1, 0.7, 10)],
        [(0.02, 1.2, 300)] * 3,
        [(0.3, 1.5, 20), (0.001, 0.6, 2000), (0.5, 3.0, 7), (1.0, 20.0, 1)],
    ]
    for mechanisms in sets:
        for delta in (1e-5, 1e-7):
            _, eps, order = epsilon(mechanisms, delta)
            yield {
                "mechanisms": [{"q": q, "sigma": s, "steps": t} for q, s, t in mechanisms],
                "delta": delta,
                "epsilon": num(eps),
                "order": num(order),
            }


def rdp_curves():
    for sigma, q in [(1.0, 0.01), (0.7, 0.2), (3.0, 0.001), (1.1, 256 / 60000), (2.0, 1.0)]:
        accountant, _, _ = epsilon([(q, sigma, 1)], 1e-5)
        yield {"sigma": sigma, "q": q, "rdp": [num(r) for r in accountant._rdp]}


def calibrations():
    for target, q, t, delta in [
        (1.0, 0.01, 1000, 1e-5),
        (3.0, 0.1, 200, 1e-5),
        (8.0, 64 / 1070, 192, 1e-5),
        (0.5, 0.001, 10000, 1e-6),
        (2.0, 1.0, 10, 1e-5),
    ]:
        sigma = dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            lambda s, q=q, t=t: event(q, s, t),
            target,
            delta,
            tol=1e-9,
        )
        yield {"epsilon": target, "q": q, "steps": t, "delta": delta, "sigma": sigma}


def main():
    # Orders whose series does not converge are dropped with a warning per order; the
    # fixture records the outcome, so the warnings are noise here.
    logging.set_verbosity(logging.ERROR)
    fixture = {
        "source": "dp-accounting 0.6.0 RdpAccountant, add-or-remove-one, default orders",
        "orders": [num(o) for o in rdp.DEFAULT_RDP_ORDERS],
        "single": list(single_cases()),
        "composed": list(composed_cases()),
        "rdp": list(rdp_curves()),
        "calibration": list(calibrations()),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1, allow_nan=False) + "\n")
    print(f"wrote {len(fixture['single'])} single, {len(fixture['composed'])} composed "
          f"cases to {OUT}")
    for case in fixture["single"][:4]:
        print(case)


if __name__ == "__main__":
    main()
