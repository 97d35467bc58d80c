"""`edgesmith tune`: device-in-the-loop mixed-precision search on measured quality and measured speed.

sensitivity.py measures each unit's KLD at 4 and 8 bits (cached), search.py turns that into a frontier and
candidates, driver.py builds, exports, measures and chooses them, report.py writes the Pareto report.
"""

from toolchain.tune.driver import tune  # noqa: F401
