"""Changes made to a message between DATA and the spool (Postfix's ``cleanup``).

``pipeline`` is the one call the SMTP side makes (route, rewrite, sign); ``message`` runs the
rewrite steps in order over raw header fields (``fields``): ``hygiene``, ``sender``, ``marker``,
``xsmtpapi``; ``dkim`` signs last.
"""
