"""Who may send what, and how much: pure checks at MAIL/RCPT time (``checks``), credentials and
the AUTH guard (``auth``), the relay-wide connection and failure counts (``anvil``, Postfix's
anvil), and rate budgets (``rates``)."""
