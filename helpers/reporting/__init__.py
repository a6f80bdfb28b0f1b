"""The report: ``report/`` (the paper, the talk, their figures and PDFs) built from ``results/`` and the
written sections of ``report/prose/``, and the checks that hold that prose to the results."""
