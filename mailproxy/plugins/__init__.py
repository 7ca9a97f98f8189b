"""
Filter plugins: built-in ones here, third-party ones in any
C{mailproxy/plugins/} directory on C{sys.path} (Twisted's plugin system).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
