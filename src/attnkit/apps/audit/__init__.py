"""`attnkit audit`: where a model's attention goes over a corpus, by token category (dates, amounts,
names, defined terms, rare tokens, boilerplate, special tokens, your own), per layer and head, with
A/B comparisons and bootstrap confidence intervals. The command is `attnkit.apps.audit.command`;
docs/audit.md explains the figures."""
