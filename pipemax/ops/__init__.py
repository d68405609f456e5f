"""Operations: what a run offers its operators around the engine loop.

* ``framing``: the control socket's frames (length-prefixed msgpack), for server and client;
* ``sockets``: where control sockets live, which are live, the sweep of stale ones;
* ``peers``: who may use a socket (peer credentials);
* ``server``: the control socket's server (threads that never touch engine state);
* ``commands``: the control commands, one entry each (arguments, handler, the client's view);
* ``ctl``: the client (``python -m pipemax.ctl``);
* ``supervisor``: the engine's hooks at step boundaries (commands, signals, progress, systemd);
* ``status``, ``progress``, ``notify``: the snapshot's renderings, the progress display,
  systemd notifications;
* ``service``: ``--serve``, jobs one after another.

The client's modules (framing, sockets, commands, ctl, status, progress) import only the
standard library and msgpack.
"""
