"""Usage: python make_c100_proxy.py <data root holding cifar100/test and cifar10/train> <out folder>

CIFAR-100 test (lossless PNG) -> a 20-superclass proxy: per fine class, images 1-80 train, 81-100 test.
Writes lossless and JPEG-q75 round-trip (PIL defaults, the same tables as the CIFAR-10 copy) tensors."""
import io, numpy as np, torch
from pathlib import Path
from PIL import Image, JpegImagePlugin
COARSE = {
 'aquatic_mammals': 'beaver dolphin otter seal whale', 'fish': 'aquarium_fish flatfish ray shark trout',
 'flowers': 'orchid poppy rose sunflower tulip', 'food_containers': 'bottle bowl can cup plate',
 'fruit_and_vegetables': 'apple mushroom orange pear sweet_pepper',
 'household_electrical_devices': 'clock keyboard lamp telephone television',
 'household_furniture': 'bed chair couch table wardrobe', 'insects': 'bee beetle butterfly caterpillar cockroach',
 'large_carnivores': 'bear leopard lion tiger wolf', 'large_man-made_outdoor_things': 'bridge castle house road skyscraper',
 'large_natural_outdoor_scenes': 'cloud forest mountain plain sea',
 'large_omnivores_and_herbivores': 'camel cattle chimpanzee elephant kangaroo',
 'medium_mammals': 'fox porcupine possum raccoon skunk', 'non-insect_invertebrates': 'crab lobster snail spider worm',
 'people': 'baby boy girl man woman', 'reptiles': 'crocodile dinosaur lizard snake turtle',
 'small_mammals': 'hamster mouse rabbit shrew squirrel', 'trees': 'maple_tree oak_tree palm_tree pine_tree willow_tree',
 'vehicles_1': 'bicycle bus motorcycle pickup_truck train', 'vehicles_2': 'lawn_mower rocket streetcar tank tractor'}
fine2coarse = {f: i for i, (c, fs) in enumerate(sorted(COARSE.items())) for f in fs.split()}
import sys
DATA, OUT = Path(sys.argv[1]), Path(sys.argv[2])
root = DATA / 'cifar100' / 'test'
assert sorted(fine2coarse) == sorted(d.name for d in root.iterdir()), 'class names'
def jpeg(a):
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format='JPEG', quality=75); buf.seek(0)
    im = Image.open(buf); q = im.quantization; sub = JpegImagePlugin.get_sampling(im)
    return np.asarray(im.convert('RGB')), q, sub
data = {k: ([], []) for k in ('train', 'test')}
for d in sorted(root.iterdir()):
    for f in sorted(d.iterdir()):
        split = 'train' if int(f.stem) <= 80 else 'test'
        data[split][0].append(np.asarray(Image.open(f).convert('RGB'))); data[split][1].append(fine2coarse[d.name])
ref = Image.open(next((DATA / 'cifar10' / 'train' / 'airplane').iterdir()))
psnr = []
for split, (imgs, labs) in data.items():
    x = np.stack(imgs); y = torch.tensor(labs)
    j = [jpeg(a) for a in x]
    assert j[0][1] == ref.quantization and j[0][2] == JpegImagePlugin.get_sampling(ref), 'tables differ from the CIFAR-10 copy'
    xj = np.stack([a for a, _, _ in j])
    mse = ((x.astype(float) - xj) ** 2).reshape(len(x), -1).mean(1); psnr += list(10 * np.log10(255 ** 2 / mse))
    for kind, arr in (('lossless', x), ('jpeg75', xj)):
        out = OUT / kind; out.mkdir(parents=True, exist_ok=True)
        torch.save({'images': torch.tensor(arr), 'labels': y, 'classes': sorted(COARSE)}, out / f'{split}_u8.pt')
print('train/test', len(data['train'][0]), len(data['test'][0]), 'PSNR q75 5/50/95 %:', np.percentile(psnr, [5, 50, 95]).round(1),
      'max abs diff', int(np.abs(np.stack(data['test'][0]).astype(int) - xj.astype(int)).max()))
