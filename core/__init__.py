"""The shared core: errors, data paths, environment variables, file utilities and the config machinery.

Every other package may import this one; it imports none of them. No product logic lives here.
"""
