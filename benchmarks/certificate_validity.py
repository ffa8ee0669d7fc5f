"""The simulation behind the README's certificate numbers: calibration sets
drawn with replacement from the demo's 2,000 test outcomes, certified as the
system runs (tests/fixtures/demo_population.py): certification rate,
violation frequency (a certified pair whose population accuracy drop exceeds
epsilon), mean certified patch cost (server-only = 1) and the oracle's (the
cheapest pair within epsilon on the population, at each draw's q_hat).

  .venv/bin/python benchmarks/certificate_validity.py [draws]     # default 1000

Rows: the shipped demo:full settings (configs/demo.py: 4,000 calibration images,
fitting split 0.3, exact test, epsilon 0.02, delta 0.1, its certify.tau_grid)
listed class by class (the worst order a folder gives) and in random order,
then what each choice buys: other tests, splits and sizes, and the settings
before the certificate was sized (1,000 images, split 0.5, betting test).
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fixtures import demo_population as demo  # noqa: E402

from rcst_jax.configs import demo as demo_config  # noqa: E402

SHIPPED = dict(n_cal=4000, split=0.3, test="exact", eps=0.02, delta=0.1, sort_by_class=True)
ROWS = [
    ("shipped", {}),
    ("shipped, random order", dict(sort_by_class=False)),
    ("shipped, eps 0.01", dict(eps=0.01)),
    ("betting (wsr)", dict(test="wsr")),
    ("Hoeffding-Bentkus", dict(test="hb")),
    ("split 0.5", dict(split=0.5)),
    ("n_cal 2,000", dict(n_cal=2000)),
    ("n_cal 3,000", dict(n_cal=3000)),
    ("before: 1,000, split 0.5, wsr", dict(n_cal=1000, split=0.5, test="wsr")),
]


def main():
  draws = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
  config = demo_config.get_config("full")
  assert (config.data.n_cal, config.certify.split, config.certify.test, config.certify.epsilon,
          config.certify.delta) == tuple(SHIPPED[k] for k in ("n_cal", "split", "test", "eps",
                                                              "delta")), "configs/demo.py moved"
  taus = [float(t) for t in config.certify.tau_grid]
  pop = demo.load()
  print(f"demo population: {len(pop['labels'])} images; certification taus {taus}; "
        f"{draws} draws per row", flush=True)
  for name, change in ROWS:
    s = {**SHIPPED, **change}
    t0 = time.perf_counter()
    got = demo.simulate(pop, draws, s["n_cal"], s["eps"], s["delta"], s["test"], seed=1,
                        split=s["split"], sort_by_class=s["sort_by_class"], taus=taus)
    slack = 3 * np.sqrt(s["delta"] * (1 - s["delta"]) / draws)
    print(json.dumps({"row": name, **s, **got, "violation_bound": round(s["delta"] + slack, 4),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
