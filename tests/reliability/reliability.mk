# Reliability scenarios (tests/reliability): included by the top-level Makefile.
# The fast scenarios run in `make test`; these run the long ones, then refresh docs/reliability.md.

##@ Reliability

SOAK_SECONDS ?= 600

.PHONY: soak
soak: install ## 10-minute steady load on 3 replicas behind HAProxy: 0 errors, RSS growth <= 10 %, stable p50 (SOAK_SECONDS=)
	SOAK_SECONDS=$(SOAK_SECONDS) $(VENV)/bin/pytest -m slow tests/reliability/test_soak.py $(PYTEST_ARGS)
	$(PY) -m tests.reliability.report

.PHONY: chaos
chaos: install ## Long fault scenarios: 200 sessions x 20 turns at concurrency 50, replicas and Redis killed in a row
	$(VENV)/bin/pytest -m slow tests/reliability --ignore=tests/reliability/test_soak.py $(PYTEST_ARGS)
	$(PY) -m tests.reliability.report

.PHONY: reliability
reliability: install ## The fast reliability scenarios (those make test runs), then rewrite docs/reliability.md's table
	$(VENV)/bin/pytest -m "not slow" tests/reliability $(PYTEST_ARGS)
	$(PY) -m tests.reliability.report
