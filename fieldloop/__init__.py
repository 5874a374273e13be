"""The field loop's workstation tools without torch: label harvested frames in a browser (``make label``), exchange
them with Label Studio (``python -m fieldloop.labelstudio``). Imports only the edgetune core and the standard
library, and runs on Python 3.10 like the edge packages."""
