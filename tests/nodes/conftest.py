"""Node tier: needs the real host booted before collection."""
import host as _host

_host.boot()
