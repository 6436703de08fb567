"""The benchmark suite behind ``holepunch-mig bench`` (and ``make bench``, which writes
docs/results/performance.md, docs/results/performance.png and build/bench.json).

Modules, bottom up:

* :mod:`~holepunch_mig.bench.payload`: the generated payload and the sink that checks it;
* :mod:`~holepunch_mig.bench.model`: the row registry (``@measurement``), configuration,
  result records and medians;
* :mod:`~holepunch_mig.bench.pair`: one side of a transfer under its meters, and the
  check of both sides' records;
* :mod:`~holepunch_mig.bench.rows`: the throughput rows (plain TCP, TLS, RPC tunnel,
  tunnel, direct, records);
* :mod:`~holepunch_mig.bench.lab_cells`: each side under ``ip netns exec`` in the fw-fw
  lab, RTT = the lab's delay stage;
* :mod:`~holepunch_mig.bench.qemu_cells`: QEMU direct vs migrate-proxy in the lab (and
  ``python -m holepunch_mig.bench.qemu_cells``, QEMU and mux measurements on one host);
* :mod:`~holepunch_mig.bench.harness`: loopback side processes, time to link, a whole run;
* :mod:`~holepunch_mig.bench.report` / :mod:`~holepunch_mig.bench.chart`: the table, the
  Markdown page, the JSON and the chart (matplotlib, the optional ``plot`` extra).

``holepunch-mig bench --quick`` is 1 GiB, 0 + 20 ms, QEMU 1 run; without root only the
loopback rows run.  The tunnel against the direct link and stop-and-wait on loopback:
``holepunch-mig bench --loopback --rows rpc-tunnel,tunnel,direct``.
"""
