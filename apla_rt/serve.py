"""``apla_rt.serve:build_app``, the import path that Serve config files name (``apla-rt serve
--print-config``, ``docs/kuberay-rayservice.yaml``): the Serve app lives in
``apla_rt.service.serve``."""

from .service.serve import build_app

__all__ = ["build_app"]
