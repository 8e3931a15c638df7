"""How the relay runs: the wiring of one relay (``main``), its event loop (``loop``), and the
acceptor processes (``supervisor`` in the main process, ``acceptor`` in each child, ``ipc``
between them, ``spill`` for large bodies on their way)."""
