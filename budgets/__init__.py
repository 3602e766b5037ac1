"""Budgets: ledger, caps, reservations, watchdog and cost reports (see the budgets issue)."""
