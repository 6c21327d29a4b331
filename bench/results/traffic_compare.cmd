fedsb compare --methods fed-sb,fedit --rank fed-sb=32,fedit=24 --validation-fraction 0 --num-supernodes 10 --out runs/traffic
# fed-sb ran with init-source=clients init-upload=sign init-fraction=0.5 basis-dtype=int4
