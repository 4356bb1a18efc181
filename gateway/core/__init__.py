"""The pure core: values in, values out.

Nothing under ``gateway.core`` does I/O, reads a clock, the environment or
randomness on its own: time comes in as ``now=``, randomness through a private
seam that tests pin. It imports no aiohttp and no SQLAlchemy.
"""
