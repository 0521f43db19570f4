from dsv3_lightning.plugins.plan.command import main

main()
