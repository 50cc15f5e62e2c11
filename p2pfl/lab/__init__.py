"""The network lab and local networks: tools beside the daemon, never imported by it.

``localnet`` launches real daemons on loopback (``make demo``, the end-to-end
tests); ``netlab``, ``labrun``, ``labwatch`` and ``netview`` build network
namespaces with rate limits, loss, NAT and partitions (root only; see
``scripts/netlab.py``). Their display and plotting packages (rich, matplotlib)
come with the ``lab`` extra: ``pip install '.[lab]'``.
"""
