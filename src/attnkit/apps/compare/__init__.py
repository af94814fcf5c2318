"""`attnkit compare`: self-attention against an LSTM, and cross-attention, measured on synthetic tasks.

`tasks` generates the data from a seed, `networks` builds the models at one parameter budget,
`train` trains and evaluates them, `measure` times steps, reads peak memory and probes the
gradient against distance, `report` writes the regenerated "At a Glance" table and the plots.
`command` is the command itself (``attnkit compare``).
"""
