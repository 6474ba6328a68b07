# Filled in by the chart issue: two targets, `operator` and `trainer`.
FROM python:3.11-slim AS base
