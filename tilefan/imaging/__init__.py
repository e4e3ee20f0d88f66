"""Image maths: operations, tile plans, and running a chain on one tile."""
