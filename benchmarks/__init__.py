"""forgeqmp's benchmarks: every operation measured against the raw QEMU baseline, side by side.

Plain scripts, not tests: ``python -m benchmarks [--quick]`` (or ``nox -s bench -- --quick``) boots
the test guest of :mod:`forgeqmp.testing` on the installed QEMU builds, runs each section, prints a
Markdown table and writes it with the raw figures as JSON into ``benchmarks/results/``. See
``docs/performance.md`` for what each figure means and the committed full run.

- :mod:`benchmarks.raw`: the raw baseline, the QEMU recipe as a minimal hand-written QMP sequence
  over bare qemu.qmp (what forgeqmp's own cost is measured against);
- :mod:`benchmarks.enable`, :mod:`benchmarks.commit`, :mod:`benchmarks.discard`,
  :mod:`benchmarks.overhead`, :mod:`benchmarks.scale`: the sections;
- :mod:`benchmarks.controller`: a separate controller process (its RSS, concurrent instances);
- :mod:`benchmarks.report`: the tables and the targets.
"""
