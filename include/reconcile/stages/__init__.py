"""Stages: each reads warehouse tables and writes warehouse tables; the runner orders them."""
