"""The test suite, a package mirroring src/privlora: test modules import the shared builders as
``from tests.builders import ...``, and modules of one name in two subpackages do not clash."""
