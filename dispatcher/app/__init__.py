"""
Putting it together: the daemon's service, the twistd plugins' options and
service makers (the only code that touches the global reactor, and the
only code that may freeze the process's heap), and the C{dispatcher}
command.

May import anything in the package.
"""
