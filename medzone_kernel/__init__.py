"""What code inside a MedZone sandbox imports: granted datasets, DICOM/volume loading, viewers,
training helpers and export requests.

It never imports the hub side's store or spawner: kernel code runs inside the sandbox without
the database and reaches the hub only through the hub API.
"""

__version__ = "0.1.0"
