"""Fleet tooling: the SD card image, per-card provisioning (flash), first boot and deploy.

``image``, ``flash`` and ``deploy`` run on a technician's or admin's Linux machine;
``firstboot`` runs on the device (it ships inside the appliance's wheel).
"""
