"""``gateway demo`` and the process harness it shares with the end-to-end tests.

:mod:`gateway.demo.story` is the demonstration story; :mod:`gateway.demo.harness`
starts, watches and stops real ``gateway serve`` processes.
"""
