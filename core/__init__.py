"""The math the methods are written in: time conventions and preconditioning, noise schedules, ODE solvers and
samplers, forward-mode derivatives, losses, backbones and the analytic Gaussian mixture.

It imports nothing from `methods` or `common` (the harness): a method may use any of it, and nothing else.
"""
