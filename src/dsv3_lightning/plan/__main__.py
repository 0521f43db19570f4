from dsv3_lightning.plan.command import main

main()
